-- SPEC §10.1 rolling re-verification: when each user's full state was last
-- asserted; the oldest users and account details are re-read first.
ALTER TABLE applied_users ADD COLUMN asserted_at TEXT;
CREATE INDEX applied_by_assertion ON applied_users (asserted_at);
CREATE INDEX accounts_by_verification ON source_accounts (source, details_at);
