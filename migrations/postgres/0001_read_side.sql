-- PostgreSQL twin of migrations/sqlite/0001 (same number, same tables and
-- columns): INTEGER is BIGINT, and the flags bound as booleans are BOOLEAN.
-- Times are RFC 3339 text on both backends, so they compare the same way.

CREATE TABLE source_accounts (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    row_json        TEXT    NOT NULL,
    row_hash        TEXT    NOT NULL,
    list_raw        TEXT    NOT NULL,
    details_json    TEXT,
    details_at      TEXT,
    first_seen      TEXT    NOT NULL,
    last_seen       TEXT    NOT NULL,
    missing_cycles  BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (source, id)
);

CREATE TABLE source_state (
    source          TEXT PRIMARY KEY,
    last_listed_at  TEXT,
    last_error      TEXT,
    last_error_at   TEXT
);

CREATE TABLE payments (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    account_id      TEXT,
    account_name    TEXT,
    amount          TEXT    NOT NULL,
    paid            BOOLEAN NOT NULL,
    is_final        BOOLEAN NOT NULL,
    paid_at         TEXT,
    row_hash        TEXT    NOT NULL,
    seen_at         TEXT    NOT NULL,
    PRIMARY KEY (source, id)
);

CREATE INDEX payments_by_account ON payments (source, account_id, paid, paid_at);

CREATE TABLE invalid_records (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    detail          TEXT    NOT NULL,
    seen_at         TEXT    NOT NULL
);

CREATE INDEX invalid_by_source ON invalid_records (source, kind);
