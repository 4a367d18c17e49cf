-- Issue 17: which read supersedes which is decided by a monotonic sequence,
-- not the wall clock (a clock stepped backwards must not make an old read
-- look new). A read's sequence is its cycle's id: assigned by the store,
-- never reused (AUTOINCREMENT), so it orders cycles across restarts.
-- seen_seq: the read that last proved the account exists (a listing that
-- names it, a live re-read); details_seq: the read that last wrote its
-- details. Rows from before this migration count as read by cycle 0.
ALTER TABLE source_accounts ADD COLUMN seen_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_accounts ADD COLUMN details_seq INTEGER;
UPDATE source_accounts SET details_seq = 0 WHERE details_at IS NOT NULL;
