package testkit

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// FindBytes lists the regular files below dir holding any of needles,
// scanning only the data extents of sparse files (cache volumes, disk
// images), raw: deleted blocks count.
func FindBytes(dir string, needles ...[]byte) ([]string, error) {
	var found []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		for _, n := range needles {
			ok, err := FileContains(p, n)
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			if ok {
				found = append(found, p)
				return nil
			}
		}
		return nil
	})
	return found, err
}

// FileContains reports whether the file at path holds needle, reading
// only its data extents.
func FileContains(path string, needle []byte) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	fd := int(f.Fd())
	buf := make([]byte, 4<<20)
	var off int64
	for {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("seek data in %s: %w", path, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return false, fmt.Errorf("seek hole in %s: %w", path, err)
		}
		// Chunks overlap by len(needle)-1 so no match is split.
		for pos := data; pos < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 && err != nil {
				return false, err
			}
			if bytes.Contains(buf[:n], needle) {
				return true, nil
			}
			if pos+int64(n) >= hole {
				break
			}
			pos += int64(max(n-len(needle)+1, 1))
		}
		off = hole
	}
}
