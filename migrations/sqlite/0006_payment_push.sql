-- SPEC §10.2: billsync_payment_to_push_seconds, from the first cycle that
-- saw a payment paid to the confirmed push of its account's user.
ALTER TABLE payments ADD COLUMN paid_seen_at TEXT;
ALTER TABLE payments ADD COLUMN pushed_at TEXT;
