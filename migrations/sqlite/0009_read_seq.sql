-- Which read supersedes which is decided by a monotonic sequence, not the
-- wall clock (a clock stepped backwards must not make an old read look
-- new). Each cycle and each payment tick takes the next value of the
-- `read_seq` counter in `meta` (Store::next_read_seq) before it reads.
-- source_accounts.seen_seq: the read that last proved the account exists
-- (a listing that names it, a live re-read); details_seq: the read that
-- last wrote its details; payments.seen_seq: the read that last wrote the
-- payment. Rows from before this migration count as read at 0.
ALTER TABLE source_accounts ADD COLUMN seen_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE source_accounts ADD COLUMN details_seq INTEGER;
UPDATE source_accounts SET details_seq = 0 WHERE details_at IS NOT NULL;
ALTER TABLE payments ADD COLUMN seen_seq INTEGER NOT NULL DEFAULT 0;
