-- check: the result of a build submitted with call=check (docker build
-- --check) as a JSON object {warnings, report, error}; '' for builds.
ALTER TABLE builds ADD COLUMN check_result TEXT NOT NULL DEFAULT '';
