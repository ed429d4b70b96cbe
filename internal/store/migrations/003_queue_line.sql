-- line_seq orders the builds that hold their cache volume and wait for a
-- build slot: they start first, in that order, before builds still
-- waiting for their scope.
ALTER TABLE builds ADD COLUMN line_seq INTEGER;
