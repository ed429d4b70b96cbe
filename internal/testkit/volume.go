package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Volume creates a sparse ext4 image file of size bytes in a temp dir, the
// same kind of file kiln's cache volumes are, and returns its path.
func Volume(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "volume.ext4")
	if err := MakeExt4(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// MakeExt4 creates path as a sparse file of size bytes holding an empty ext4
// filesystem.
func MakeExt4(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("create volume file: %w", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("size volume file to %d bytes: %w", size, err)
	}
	// No reserved blocks: the whole volume is BuildKit cache, not a root fs.
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", path).CombinedOutput()
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", path, err, out)
	}
	return nil
}
