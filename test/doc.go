// Package test holds kiln's end-to-end tests: each starts the real kiln
// binary (bin/kiln serve, with the process runtime, real buildkitd, the
// embedded registry and SQLite) and drives it over HTTP, the CLI and
// registry clients (skopeo, oras, crane), as a user would.
package test
