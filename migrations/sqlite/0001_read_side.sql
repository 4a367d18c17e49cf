-- The read side: what each source listed, its details, and payments.

CREATE TABLE source_accounts (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    row_json        TEXT    NOT NULL,           -- the list row as sent
    row_hash        TEXT    NOT NULL,           -- hash of the fields billsync uses
    list_raw        TEXT    NOT NULL,           -- decoded list row (RawAccount JSON)
    details_json    TEXT,                       -- decoded details; NULL until fetched
    details_at      TEXT,
    first_seen      TEXT    NOT NULL,
    last_seen       TEXT    NOT NULL,           -- while listed: see source_state.last_listed_at
    missing_cycles  INTEGER NOT NULL DEFAULT 0, -- consecutive complete listings without it
    PRIMARY KEY (source, id)
) WITHOUT ROWID;

CREATE TABLE source_state (
    source          TEXT PRIMARY KEY,
    last_listed_at  TEXT,                       -- last complete listing
    last_error      TEXT,
    last_error_at   TEXT
);

CREATE TABLE payments (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    account_id      TEXT,                       -- resolved owner; NULL if unresolved
    account_name    TEXT,
    amount          TEXT    NOT NULL,
    paid            INTEGER NOT NULL,
    is_final        INTEGER NOT NULL,
    paid_at         TEXT,
    row_hash        TEXT    NOT NULL,
    seen_at         TEXT    NOT NULL,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;

CREATE INDEX payments_by_account ON payments (source, account_id, paid, paid_at);

CREATE TABLE invalid_records (
    source          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    kind            TEXT    NOT NULL,           -- account | payment
    reason          TEXT    NOT NULL,           -- metric label
    detail          TEXT    NOT NULL,
    seen_at         TEXT    NOT NULL
);

CREATE INDEX invalid_by_source ON invalid_records (source, kind);
