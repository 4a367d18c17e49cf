-- SPEC §10.1 (v3) "due, then paced": the Unix second each verification
-- period counts from (the last verification, or for a first round that
-- moment minus a stable per-key stagger). Due once verify_from + period
-- has passed. Accounts: NULL while no details were ever read (the listing
-- carries everything, so every listing verifies them). Users: NULL is due.
ALTER TABLE applied_users ADD COLUMN verify_from INTEGER;
UPDATE applied_users
   SET verify_from = CAST(strftime('%s', COALESCE(asserted_at, applied_at)) AS INTEGER);
CREATE INDEX applied_by_due ON applied_users (verify_from, login);

ALTER TABLE source_accounts ADD COLUMN verify_from INTEGER;
UPDATE source_accounts
   SET verify_from = CAST(strftime('%s', details_at) AS INTEGER)
 WHERE details_at IS NOT NULL;
-- Listed accounts only (gone rows keep old times and would lead the order).
CREATE INDEX accounts_by_due ON source_accounts (source, missing_cycles, verify_from, id);

-- The slices are chosen by verify_from now; these served the old order.
DROP INDEX applied_by_assertion;
DROP INDEX accounts_by_verification;

-- A frozen source's users, looked up each cycle while it is frozen.
CREATE INDEX applied_by_source ON applied_users (source);
