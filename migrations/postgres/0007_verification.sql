-- PostgreSQL twin of migrations/sqlite/0007 (its indexes are dropped by
-- 0008, on both backends).
ALTER TABLE applied_users ADD COLUMN asserted_at TEXT;
CREATE INDEX applied_by_assertion ON applied_users (asserted_at);
CREATE INDEX accounts_by_verification ON source_accounts (source, details_at);
