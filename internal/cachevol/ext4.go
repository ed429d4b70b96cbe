package cachevol

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// mkfsArgs make a filesystem whose creation cost does not grow with its
// size: lazy init skips zeroing, and because mke2fs discards (punches) a
// regular file first, the inode tables count as zeroed and the kernel's
// lazyinit thread never fills the sparse file in the background.
var mkfsArgs = []string{"-q", "-F", "-m", "0",
	"-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
	"-L", "kiln"}

// findMkfs looks beyond PATH because non-root shells on Debian do not have
// the sbin directories in it.
func findMkfs() (string, error) {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("mkfs.ext4 not found in PATH, /usr/sbin or /sbin: install the Debian package e2fsprogs (apt-get install e2fsprogs)")
}

// makeImage creates a sparse file of size bytes at path and formats it.
// The caller owns the path and removes it on error.
func makeImage(ctx context.Context, mkfs, path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create image file: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("size image file to %d bytes: %w", size, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close image file: %w", err)
	}
	cmd := exec.CommandContext(ctx, mkfs, append(append([]string{}, mkfsArgs...), path)...)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("mkfs.ext4 interrupted: %w", ctx.Err())
		}
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", path, err, strings.TrimSpace(out.String()))
	}
	return nil
}

// allocatedBytes is what the sparse image really costs on the host.
func allocatedBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// loopDevicesFor lists loop devices backed by path. A volume still attached
// after its build must not be handed to the next one: a second mount of the
// same ext4 through another loop device corrupts it.
func loopDevicesFor(path string) []string {
	want, err := filepath.EvalSymlinks(path)
	if err != nil {
		want = path
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var devs []string
	for _, bf := range files {
		b, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == want {
			devs = append(devs, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(bf))))
		}
	}
	return devs
}
