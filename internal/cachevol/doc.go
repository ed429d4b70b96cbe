// Package cachevol owns the per-cache-scope BuildKit root volumes: one ext4
// filesystem in a sparse file per scope, attached exclusively to one build
// at a time, recreated empty when the BuildKit version changes, and evicted
// as whole volumes (least recently used, idle only) to respect host limits.
//
// The package deals in image files and their lifecycle only. Runtimes
// attach Volume.Path (a loop mount for the process runtime, a virtio-blk
// disk for the vm runtime) and must detach it before Volume.Release.
//
// On disk, under the data directory:
//
//	volumes/<sha256(scope)[:32]>/lock         lock held by the attaching process
//	volumes/<sha256(scope)[:32]>/meta.json    commit record: present = valid volume
//	volumes/<sha256(scope)[:32]>/volume.ext4  the filesystem image
//	scratch/<random>/{lock,volume.ext4}       one-build volumes, deleted on Release
//
// Scopes come from token claims and are untrusted, so they only ever reach
// the file system hashed; the scope text itself lives in meta.json.
package cachevol
