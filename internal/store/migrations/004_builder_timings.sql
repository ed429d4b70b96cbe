-- builder_reused: the build ran on a builder kept up from an earlier build
-- of its scope. timings: seconds per phase (queued, builder_start,
-- context_transfer, solve, export, push) as a JSON object.
ALTER TABLE builds ADD COLUMN builder_reused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN timings TEXT NOT NULL DEFAULT '{}';
