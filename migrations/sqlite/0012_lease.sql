-- SPEC §13: the leader lease, one row, used on PostgreSQL (on SQLite the
-- file lock makes one writer; the table is here so both schemas match).
-- The holder is a node name plus an id drawn at each process start; the
-- epoch rises at each takeover; times are the database's, in Unix ms.
CREATE TABLE lease (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    since_ms   INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
