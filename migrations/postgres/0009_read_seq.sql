-- PostgreSQL twin of migrations/sqlite/0009.
ALTER TABLE source_accounts ADD COLUMN seen_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE source_accounts ADD COLUMN details_seq BIGINT;
ALTER TABLE payments ADD COLUMN seen_seq BIGINT NOT NULL DEFAULT 0;
