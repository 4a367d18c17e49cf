-- Logins whose last VMS request may or may not have applied (SPEC §9.1):
-- written before the request goes out, removed when an answer proves it.
CREATE TABLE in_doubt (
    login      TEXT PRIMARY KEY,
    op         TEXT NOT NULL,          -- create | update | block | delete
    source     TEXT NOT NULL,
    account_id TEXT NOT NULL,
    state_json TEXT NOT NULL,          -- the state the request asked for
    since      TEXT NOT NULL
) WITHOUT ROWID;
