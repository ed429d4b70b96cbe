CREATE TABLE builds (
	id            TEXT PRIMARY KEY,
	seq           INTEGER NOT NULL UNIQUE, -- submission order, for queue position and paging
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
	context_bytes INTEGER NOT NULL DEFAULT 0,
	attempt       INTEGER NOT NULL DEFAULT 1,
	created_at    INTEGER NOT NULL,
	started_at    INTEGER,
	finished_at   INTEGER
);
CREATE INDEX builds_status ON builds (status, seq);

CREATE TABLE build_events (
	build_id TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
	seq      INTEGER NOT NULL,
	kind     TEXT NOT NULL,
	data     TEXT NOT NULL,
	PRIMARY KEY (build_id, seq)
) WITHOUT ROWID;

CREATE TABLE images (
	name       TEXT PRIMARY KEY, -- repository:tag
	repository TEXT NOT NULL,
	tag        TEXT NOT NULL,
	digest     TEXT NOT NULL,
	build_id   TEXT NOT NULL DEFAULT '',
	created_at INTEGER NOT NULL
);
CREATE INDEX images_digest ON images (digest);
