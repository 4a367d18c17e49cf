-- PostgreSQL twin of migrations/sqlite/0006.
ALTER TABLE payments ADD COLUMN paid_seen_at TEXT;
ALTER TABLE payments ADD COLUMN pushed_at TEXT;
