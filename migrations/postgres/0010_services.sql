-- PostgreSQL twin of migrations/sqlite/0010.
CREATE TABLE services (
    source         TEXT NOT NULL,
    id             TEXT NOT NULL,
    owner_id       TEXT NOT NULL,
    raw_json       TEXT NOT NULL,
    raw_status     TEXT,
    state          TEXT NOT NULL,
    settled        TEXT,
    missing_cycles BIGINT NOT NULL DEFAULT 0,
    seen_seq       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (source, id)
);
CREATE INDEX services_by_owner ON services (source, owner_id);
