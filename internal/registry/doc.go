// Package registry embeds a real OCI registry (distribution/distribution v3
// as a library) behind kiln's registry-token auth.
//
// Registry serves the distribution API under /v2/ and kiln's token endpoint
// at Config.TokenPath, so any OCI client (skopeo, crane, BuildKit,
// containerd) can log in with a kiln token: the registry challenges with a
// Bearer realm built from the request's own Host, the client exchanges its
// kiln token there for a registry token, and the registry's "kiln" access
// controller checks that token on every request.
//
// The helpers (Resolve, Tag, DeleteTag, Manifest, Catalog, Tags) work on the
// same storage directly, for the rest of kiln, without going through HTTP
// auth.
package registry
