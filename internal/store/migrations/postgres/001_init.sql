-- 001_init.sql for PostgreSQL: the same tables as ../001_init.sql, with
-- BIGINT where SQLite's INTEGER holds 64 bits (times in microseconds,
-- sequence numbers, sizes) and byte-order collation ("C", as SQLite's
-- BINARY) on keys that are listed in order or matched as ranges.
CREATE TABLE builds (
	id            TEXT COLLATE "C" PRIMARY KEY,
	seq           BIGINT NOT NULL UNIQUE, -- submission order, for queue position and paging
	status        TEXT NOT NULL,
	phase         TEXT NOT NULL DEFAULT '',
	subject       TEXT NOT NULL,
	cache_scope   TEXT NOT NULL DEFAULT '',
	tags          TEXT NOT NULL DEFAULT '[]',
	options       TEXT NOT NULL DEFAULT '{}',
	image_digest  TEXT NOT NULL DEFAULT '',
	steps_total   INTEGER NOT NULL DEFAULT 0,
	steps_cached  INTEGER NOT NULL DEFAULT 0,
	dedup_of      TEXT NOT NULL DEFAULT '',
	input_hash    TEXT NOT NULL DEFAULT '',
	error         TEXT NOT NULL DEFAULT '',
	runtime       TEXT NOT NULL DEFAULT '',
	context_bytes BIGINT NOT NULL DEFAULT 0,
	attempt       INTEGER NOT NULL DEFAULT 1,
	created_at    BIGINT NOT NULL,
	started_at    BIGINT,
	finished_at   BIGINT
);
CREATE INDEX builds_status ON builds (status, seq);

CREATE TABLE build_events (
	build_id TEXT COLLATE "C" NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
	seq      BIGINT NOT NULL,
	kind     TEXT NOT NULL,
	data     TEXT NOT NULL,
	PRIMARY KEY (build_id, seq)
);

CREATE TABLE images (
	name       TEXT COLLATE "C" PRIMARY KEY, -- repository:tag
	repository TEXT COLLATE "C" NOT NULL,
	tag        TEXT NOT NULL,
	digest     TEXT NOT NULL,
	build_id   TEXT NOT NULL DEFAULT '',
	created_at BIGINT NOT NULL
);
CREATE INDEX images_digest ON images (digest);
