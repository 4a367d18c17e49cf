-- Small remembered values (the hash definition in use, settings last seen)
-- and notices for operators (a setting the VMS cannot apply to old users).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE notices (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    message TEXT NOT NULL
);
