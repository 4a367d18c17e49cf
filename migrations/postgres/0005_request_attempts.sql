-- PostgreSQL twin of migrations/sqlite/0005.
ALTER TABLE control_requests ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE control_requests ADD COLUMN dropped BOOLEAN NOT NULL DEFAULT FALSE;
