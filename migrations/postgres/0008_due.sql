-- PostgreSQL twin of migrations/sqlite/0008. A PostgreSQL store starts at
-- this schema's version (0.7), empty: SQLite's back-fill of verify_from
-- has no rows to fill here.
ALTER TABLE applied_users ADD COLUMN verify_from BIGINT;
CREATE INDEX applied_by_due ON applied_users (verify_from, login);

ALTER TABLE source_accounts ADD COLUMN verify_from BIGINT;
CREATE INDEX accounts_by_due ON source_accounts (source, missing_cycles, verify_from, id);

DROP INDEX applied_by_assertion;
DROP INDEX accounts_by_verification;

CREATE INDEX applied_by_source ON applied_users (source);
