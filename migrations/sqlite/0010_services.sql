-- SPEC §12.1: what each account bought. One row per service or
-- subscription; `state` is the canonical state of the last read, `settled`
-- the last state that was not pending (what a pending service keeps, with
-- the raw row it settled with); `raw_status` is always the last read's.
-- A service absent from complete listings counts missing cycles, and past
-- the grace it is closed. `seen_seq` orders reads (as for accounts).
CREATE TABLE services (
    source         TEXT NOT NULL,
    id             TEXT NOT NULL,
    owner_id       TEXT NOT NULL,
    raw_json       TEXT NOT NULL,
    raw_status     TEXT,
    state          TEXT NOT NULL,
    settled        TEXT,
    missing_cycles INTEGER NOT NULL DEFAULT 0,
    seen_seq       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE INDEX services_by_owner ON services (source, owner_id);
