-- A service row is rewritten only when its hash changes (as accounts'
-- rows are); rows stored before this have none, so their next read writes
-- them once.
ALTER TABLE services ADD COLUMN row_hash TEXT NOT NULL DEFAULT '';
