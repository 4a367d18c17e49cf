-- PostgreSQL twin of migrations/sqlite/0013: the login index.
ALTER TABLE source_accounts ADD COLUMN login TEXT;
ALTER TABLE source_accounts ADD COLUMN login_indexed BOOLEAN;
CREATE INDEX accounts_by_login ON source_accounts (login) WHERE login IS NOT NULL;
CREATE INDEX accounts_unindexed ON source_accounts (source) WHERE login_indexed IS NULL;
-- Each cycle looks up the accounts whose paid payments are still to be
-- timed: a few, among every payment kept.
CREATE INDEX payments_unpushed ON payments (source, account_id) WHERE pushed_at IS NULL;
