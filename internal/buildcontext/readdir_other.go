//go:build !linux

package buildcontext

import (
	"errors"
	"io/fs"
	"os"
)

// readDirStat lists dir sorted by name, with each entry's lstat; entries
// removed since the directory was read are left out.
func readDirStat(dir string) ([]fs.FileInfo, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := make([]fs.FileInfo, 0, len(entries))
	for _, de := range entries {
		info, err := de.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}
