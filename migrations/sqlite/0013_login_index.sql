-- Issue 21: the login each stored account yields, so a targeted cycle finds
-- the accounts that share its logins without normalizing every account.
-- `login_indexed` is NULL while the row changed since its login was worked
-- out (or never was): the writers of list_raw and details_json clear it,
-- and whoever needs such a row normalizes it. An indexed row that yields no
-- login (an invalid account) has `login` NULL. Which normalizer settings the
-- index was worked out with is in `meta` (`login_index:SOURCE`).
ALTER TABLE source_accounts ADD COLUMN login TEXT;
ALTER TABLE source_accounts ADD COLUMN login_indexed INTEGER;
CREATE INDEX accounts_by_login ON source_accounts (login) WHERE login IS NOT NULL;
CREATE INDEX accounts_unindexed ON source_accounts (source) WHERE login_indexed IS NULL;
-- Each cycle looks up the accounts whose paid payments are still to be
-- timed: a few, among every payment kept.
CREATE INDEX payments_unpushed ON payments (source, account_id) WHERE pushed_at IS NULL;
