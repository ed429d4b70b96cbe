// Package testkit holds helpers for kiln's tests that need real components:
// a buildkitd binary, a busybox base-image build context, a plain OCI
// registry on loopback and ext4 volume images. Import it only from _test
// files; every helper registers its own cleanup with t.Cleanup.
package testkit
