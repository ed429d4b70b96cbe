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
// The helpers (Resolve, Tag, DeleteTag, Manifest, Catalog, Tags, Blob, the
// ingest calls and GC) work on the same storage directly, for the rest of
// kiln, without going through HTTP auth.
//
// What distribution v3 lacks of OCI distribution-spec 1.1 is served in
// front of it (referrers.go): the referrers API over a per-repository
// index that every way a manifest enters a repository writes (a push,
// Tag, PutManifest) and that repositories of an older kiln get on their
// first referrers query; OCI-Subject; sha512 blobs and manifests, mounts
// and Tag included. The distribution-spec conformance suite passes with
// every area on but sparse manifests and ?tag= pushes (conformance_test.go),
// and oras, skopeo and crane are run against it in test/clients_test.go.
//
// Storage is one distribution storage driver, built once from
// Config.Storage (the filesystem under Config.RootDir, or an S3 bucket)
// and shared by the HTTP API and the helpers. Nothing here reads the
// registry through OS paths, so everything works the same on S3.
package registry
