-- 002_tenancy.sql for PostgreSQL: as ../002_tenancy.sql, with split_part
-- for SQLite's instr/substr and BIGINT times.
ALTER TABLE builds ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
UPDATE builds SET tenant = split_part(cache_scope, '.', 1);
CREATE INDEX builds_tenant ON builds (tenant, seq);
CREATE INDEX builds_input_hash ON builds (input_hash);

CREATE TABLE tokens (
	id          TEXT COLLATE "C" PRIMARY KEY,
	subject     TEXT NOT NULL,
	tenant      TEXT NOT NULL,
	cache_scope TEXT NOT NULL,
	scopes      TEXT NOT NULL,
	created_at  BIGINT NOT NULL,
	expires_at  BIGINT NOT NULL,
	revoked_at  BIGINT
);
