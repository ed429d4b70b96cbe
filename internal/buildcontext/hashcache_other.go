//go:build !linux && !darwin

package buildcontext

import "io/fs"

// platformStatKey: elsewhere the key is path, size and mtime only, and the
// racy-entry rule (see racyWindow) is what keeps it safe against quick
// same-size edits.
func platformStatKey(fs.FileInfo, *statKey) {}
