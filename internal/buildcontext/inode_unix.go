//go:build unix

package buildcontext

import (
	"io/fs"
	"syscall"
)

type inodeKey struct{ dev, ino uint64 }

// inodeOf identifies a regular file that has other names, so Pack can send
// the later names as hard links instead of copies.
func inodeOf(info fs.FileInfo) (inodeKey, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok || st.Nlink < 2 {
		return inodeKey{}, false
	}
	return inodeKey{dev: uint64(st.Dev), ino: uint64(st.Ino)}, true
}
