-- SPEC §10.4: a request is taken by each cycle that starts with it; after
-- three cycles that did not complete it is dropped and reported.
ALTER TABLE control_requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE control_requests ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;
