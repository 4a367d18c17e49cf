-- The purge of gone accounts asks, for each, whether a live user of it is
-- applied: by (source, account_id), not by walking every user of the
-- source. The new index serves the lookups by source alone too.
CREATE INDEX applied_by_owner ON applied_users (source, account_id);
DROP INDEX applied_by_source;
