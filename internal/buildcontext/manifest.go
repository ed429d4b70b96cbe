package buildcontext

// Manifest describes a build context by content instead of by bytes: the
// CLI sends it with only the blobs the server lacks, and the server
// materializes the tree from its content store (Materialize). A context
// sent as a Manifest and the same context sent as a tar get the same
// Info.Hash, so they deduplicate against each other.
//
// JSON, as sent in the multipart field "context_manifest":
//
//	{"version": 1, "entries": [
//	  {"path": "src", "type": "dir", "mode": 493},
//	  {"path": "src/main.go", "type": "file", "mode": 420, "size": 1234, "digest": "sha256:…"},
//	  {"path": "src/link", "type": "symlink", "target": "main.go"},
//	  {"path": "src/copy.go", "type": "hardlink", "target": "src/main.go"}
//	]}
//
// Paths are slash-separated, relative to the context root, clean, without
// "./" or a trailing slash. Parents need not be listed (they are made with
// mode 0755, as Receive does for a tar). Entries follow the tar rules of
// Receive: no path twice, nothing beneath a symlink, symlink targets that
// stay inside the context, hard links to a file listed earlier.
type Manifest struct {
	Version int             `json:"version"`
	Entries []ManifestEntry `json:"entries"`
}

// ManifestVersion is the only Manifest.Version this kiln reads.
const ManifestVersion = 1

// ManifestEntry is one path of a Manifest.
type ManifestEntry struct {
	Path string `json:"path"`
	// Type is EntryFile, EntryDir, EntrySymlink or EntryHardlink.
	Type string `json:"type"`
	// Mode holds the permission bits, plus 0o1000 (sticky) on directories.
	Mode uint32 `json:"mode,omitempty"`
	// Size and Digest ("sha256:<hex>") describe a file's content.
	Size   int64  `json:"size,omitempty"`
	Digest string `json:"digest,omitempty"`
	// Target is a symlink's target as on disk, or the context path a hard
	// link shares its inode with.
	Target string `json:"target,omitempty"`
}

// Manifest entry types.
const (
	EntryFile     = "file"
	EntryDir      = "dir"
	EntrySymlink  = "symlink"
	EntryHardlink = "hardlink"
)
