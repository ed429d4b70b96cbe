package cachevol

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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

// superblock holds the few ext4 superblock fields kiln reports. The kernel
// writes the free counts back on unmount and sync, so for an idle volume
// they are exact; for an attached one they are as of its last commit.
type superblock struct {
	blocks    uint64
	free      uint64
	blockSize int64
	hasErrors bool
}

func (s superblock) usedBytes() int64 { return int64(s.blocks-s.free) * s.blockSize }

const (
	sbOffset      = 1024
	ext4Magic     = 0xEF53
	incompat64bit = 0x80
	stateErrorFS  = 0x2
)

func readSuperblock(path string) (superblock, error) {
	f, err := os.Open(path)
	if err != nil {
		return superblock{}, err
	}
	defer f.Close()
	buf := make([]byte, 1024)
	if _, err := f.ReadAt(buf, sbOffset); err != nil {
		if errors.Is(err, io.EOF) {
			return superblock{}, fmt.Errorf("read ext4 superblock of %s: file too short", path)
		}
		return superblock{}, fmt.Errorf("read ext4 superblock of %s: %w", path, err)
	}
	le := binary.LittleEndian
	if m := le.Uint16(buf[0x38:]); m != ext4Magic {
		return superblock{}, fmt.Errorf("%s is not an ext4 filesystem (superblock magic %#04x)", path, m)
	}
	logBS := le.Uint32(buf[0x18:])
	if logBS > 6 {
		return superblock{}, fmt.Errorf("ext4 superblock of %s: implausible block size 1024<<%d", path, logBS)
	}
	sb := superblock{
		blocks:    uint64(le.Uint32(buf[0x04:])),
		free:      uint64(le.Uint32(buf[0x0C:])),
		blockSize: 1024 << logBS,
		hasErrors: le.Uint16(buf[0x3A:])&stateErrorFS != 0,
	}
	if le.Uint32(buf[0x60:])&incompat64bit != 0 {
		sb.blocks |= uint64(le.Uint32(buf[0x150:])) << 32
		sb.free |= uint64(le.Uint32(buf[0x158:])) << 32
	}
	if sb.free > sb.blocks {
		return superblock{}, fmt.Errorf("ext4 superblock of %s: free blocks %d exceed block count %d", path, sb.free, sb.blocks)
	}
	return sb, nil
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
