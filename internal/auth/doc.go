// Package auth issues and verifies kiln's tokens.
//
// There are two kinds of token, both EdDSA-signed JWTs from the same
// server key:
//
//   - kiln tokens (Issue/Verify) are what users and build workers present to
//     the REST API. They carry a subject, scopes, an optional cache_scope and
//     an optional access list that narrows registry access (the server mints
//     such tokens per build so a build can push only its own repositories).
//   - registry tokens (IssueRegistryToken/VerifyRegistryToken) follow the
//     Docker registry token specification. OCI clients obtain them from
//     TokenHandler by presenting a kiln token, and the embedded registry
//     accepts nothing else.
//
// The two kinds cannot stand in for each other: registry tokens always carry
// an audience and kiln tokens never do.
package auth
