-- Every build belongs to a tenant: the token's namespace, else its cache
-- scope up to the first '.', which is what existing builds get.
ALTER TABLE builds ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
UPDATE builds SET tenant = CASE WHEN instr(cache_scope, '.') > 0
	THEN substr(cache_scope, 1, instr(cache_scope, '.') - 1) ELSE cache_scope END;
CREATE INDEX builds_tenant ON builds (tenant, seq);
CREATE INDEX builds_input_hash ON builds (input_hash);

-- Tokens issued through the API (and the admin token written at first
-- start), so they can be listed and revoked. The token itself is never
-- stored: only what it says.
CREATE TABLE tokens (
	id          TEXT PRIMARY KEY,
	subject     TEXT NOT NULL,
	tenant      TEXT NOT NULL,
	cache_scope TEXT NOT NULL,
	scopes      TEXT NOT NULL,
	created_at  INTEGER NOT NULL,
	expires_at  INTEGER NOT NULL,
	revoked_at  INTEGER
);
