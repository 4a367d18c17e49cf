-- PostgreSQL twin of migrations/sqlite/0012: the leader lease (SPEC §13).
CREATE TABLE lease (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    since_ms   BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
