-- The write side: desired and applied state, the plan, retries, quarantine,
-- cycles, the audit log, operator requests, write-backs.

CREATE TABLE desired_users (
    login       TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    state_json  TEXT NOT NULL,
    hash        TEXT NOT NULL,
    rules       TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;

-- What the VMS confirmed (2xx), per login. Moves only on a 2xx.
CREATE TABLE applied_users (
    login       TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    state_json  TEXT NOT NULL,
    hash        TEXT NOT NULL,         -- content hash of state_json's state
    applied_at  TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE applied_tree (
    external_id TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TEXT NOT NULL
) WITHOUT ROWID;

-- The current plan, persisted before any push; replaced every cycle.
CREATE TABLE plan_ops (
    seq         INTEGER PRIMARY KEY,
    cycle_id    INTEGER NOT NULL,
    login       TEXT NOT NULL,
    action      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    deprovision INTEGER NOT NULL,
    state       TEXT NOT NULL          -- planned | held
);
CREATE INDEX plan_ops_by_login ON plan_ops (login);

CREATE TABLE retry_state (
    login           TEXT PRIMARY KEY,
    attempts        INTEGER NOT NULL,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE quarantine (
    key         TEXT NOT NULL,         -- login, or external_id for tree parts
    part        TEXT NOT NULL,         -- user | tree | writeback
    error       TEXT NOT NULL,
    since       TEXT NOT NULL,
    hash        TEXT NOT NULL,         -- desired hash when quarantined
    PRIMARY KEY (key, part)
) WITHOUT ROWID;

CREATE TABLE conflicts (
    login       TEXT NOT NULL,
    sources     TEXT NOT NULL          -- JSON list of "source:id", winner first
);

CREATE TABLE cycles (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    result      TEXT,
    summary     TEXT
);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    cycle_id    INTEGER NOT NULL,
    at          TEXT NOT NULL,
    login       TEXT NOT NULL,
    action      TEXT NOT NULL,
    result      TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_by_time ON audit (at);
CREATE INDEX audit_by_login ON audit (login);

CREATE TABLE control_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,        -- resync | approve
    logins       TEXT,                 -- JSON list for a named resync; NULL: all
    requested_at TEXT NOT NULL,
    consumed_at  TEXT,
    cycle_id     INTEGER
);

CREATE TABLE writebacks (
    source      TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    value       TEXT NOT NULL,
    written_at  TEXT NOT NULL,
    PRIMARY KEY (source, account_id)
) WITHOUT ROWID;
