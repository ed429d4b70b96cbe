// Package mirror resolves the base images a Dockerfile names (FROM node:22,
// FROM ghcr.io/org/img:tag, FROM host/x@sha256:…) through kiln's own
// registry: the first use of an image copies it from its upstream registry
// into kiln's store under mirror/<host>/<path>, later builds are served from
// there, and every build is pinned to a manifest digest.
//
// Resolve turns a reference into a Pinned digest: a digest in the reference
// is the pin; otherwise a tag mirrored before answers from the local store
// without network, unless the build asked to pull, in which case the
// upstream registry is asked again. Ensure copies the pinned image
// (manifests, config, layers; blobs already held are linked, not fetched)
// and tags it so the next Resolve of the tag is local.
//
// For a multi-platform image Ensure keeps the index byte for byte (so its
// digest stays the pin) but copies only the children for Config.Platforms
// (default linux/<host arch>). Attestation manifests and other platforms
// are left upstream; a build for a platform not mirrored fails with
// "manifest unknown" from kiln's registry, and the operator adds that
// platform to the configuration.
//
// Upstream registries are spoken to as Docker does: https by default (plain
// http for Config.Insecure hosts and loopback addresses), Docker Hub at
// registry-1.docker.io, Bearer token challenges answered at the realm the
// registry names (anonymously, or with the configured credentials), Basic
// challenges answered with the configured username and password.
package mirror
