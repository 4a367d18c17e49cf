-- PostgreSQL twin of migrations/sqlite/0011.
ALTER TABLE services ADD COLUMN row_hash TEXT NOT NULL DEFAULT '';
