-- PostgreSQL twin of migrations/sqlite/0004.
CREATE TABLE in_doubt (
    login      TEXT PRIMARY KEY,
    op         TEXT NOT NULL,
    source     TEXT NOT NULL,
    account_id TEXT NOT NULL,
    state_json TEXT NOT NULL,
    since      TEXT NOT NULL
);
