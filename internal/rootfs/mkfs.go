package rootfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// tools names the program each format needs and the Debian package that
// ships it.
var tools = map[Format]struct{ bin, pkg string }{
	FormatErofs: {"mkfs.erofs", "erofs-utils"},
	FormatExt4:  {"mkfs.ext4", "e2fsprogs"},
}

// CheckTools reports whether the program that builds format f is installed,
// with the package to install if not.
func CheckTools(f Format) error {
	t, ok := tools[f]
	if !ok {
		return fmt.Errorf("unknown rootfs format %q: use %q or %q", f, FormatErofs, FormatExt4)
	}
	if _, err := lookTool(t.bin); err != nil {
		return fmt.Errorf("%s is not installed, so %s root filesystems cannot be built: install the %s package (apt-get install -y %s)", t.bin, f, t.pkg, t.pkg)
	}
	return nil
}

// lookTool finds a tool in PATH or in the sbin directories a non-login
// PATH often lacks.
func lookTool(bin string) (string, error) {
	if p, err := exec.LookPath(bin); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, bin)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", bin)
}

func buildFS(ctx context.Context, opt Options, dgst, dir, out string) error {
	tree, err := scanTree(ctx, dir)
	if err != nil {
		return fmt.Errorf("scan staged tree: %w", err)
	}
	uuid := uuidFor(dgst)
	switch opt.Format {
	case FormatErofs:
		return mkfsErofs(ctx, opt.Compression, uuid, tree, dir, out)
	case FormatExt4:
		return mkfsExt4(ctx, uuid, tree, dir, out)
	}
	return fmt.Errorf("unknown rootfs format %q", opt.Format)
}

// treeStats sizes the staged tree for mkfs.ext4 and finds the newest mtime
// for mkfs.erofs.
type treeStats struct {
	inodes   int64
	bytes    int64 // rounded up to 4 KiB blocks
	maxMtime int64
}

func scanTree(ctx context.Context, dir string) (treeStats, error) {
	var s treeStats
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Mtim.Sec > s.maxMtime {
			s.maxMtime = st.Mtim.Sec
		}
		if st.Nlink > 1 && !fi.IsDir() {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		s.inodes++
		s.bytes += (fi.Size() + 4095) &^ 4095
		if fi.IsDir() {
			s.bytes += 4096
		}
		return nil
	})
	return s, err
}

// uuidFor derives a filesystem UUID from the digest, so the same image
// always yields the same bytes.
func uuidFor(dgst string) string {
	h := sha256.Sum256([]byte("kiln rootfs " + dgst))
	h[6] = h[6]&0x0f | 0x50 // version 5 style, name-based
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

var (
	erofsHelpOnce sync.Once
	erofsHelp     string
)

// erofsSupports reports whether this mkfs.erofs lists flag in its help;
// options differ between erofs-utils releases.
func erofsSupports(bin, flag string) bool {
	erofsHelpOnce.Do(func() {
		out, _ := exec.Command(bin, "--help").CombinedOutput()
		erofsHelp = string(out)
	})
	return strings.Contains(erofsHelp, flag)
}

func mkfsErofs(ctx context.Context, compression, uuid string, tree treeStats, dir, out string) error {
	bin, err := lookTool("mkfs.erofs")
	if err != nil {
		return CheckTools(FormatErofs)
	}
	// Ownership and xattrs are kept by default (no --all-root, -x default
	// keeps xattrs). SOURCE_DATE_EPOCH fixes the build time but clamps
	// newer mtimes to it, so it is the newest mtime in the tree: every file
	// keeps its own, and the image is reproducible.
	args := []string{"--quiet", "-U", uuid}
	if erofsSupports(bin, "--preserve-mtime") {
		args = append(args, "--preserve-mtime")
	}
	if compression != "" {
		args = append(args, "-z"+compression)
	}
	args = append(args, out, dir)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "SOURCE_DATE_EPOCH="+strconv.FormatInt(max(tree.maxMtime, 0), 10))
	return run(ctx, cmd)
}

func mkfsExt4(ctx context.Context, uuid string, tree treeStats, dir, out string) error {
	bin, err := lookTool("mkfs.ext4")
	if err != nil {
		return CheckTools(FormatExt4)
	}
	// Room for the data, 256-byte inodes with a quarter spare, and
	// metadata slack; an ext4 image cannot grow once a VM has it.
	inodes := tree.inodes + tree.inodes/4 + 1024
	size := tree.bytes + tree.bytes/10 + inodes*256 + 32<<20
	size = (size + 4095) &^ 4095
	f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("size ext4 image: %w", err)
	}
	// No journal: the image is shared read-only by every VM of the digest.
	args := []string{"-q", "-F", "-b", "4096", "-m", "0", "-I", "256",
		"-N", strconv.FormatInt(inodes, 10), "-O", "^has_journal",
		"-U", uuid, "-E", "hash_seed=" + uuid,
		"-d", dir, out}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME="+strconv.FormatInt(max(tree.maxMtime, 1), 10))
	return run(ctx, cmd)
}

func run(ctx context.Context, cmd *exec.Cmd) error {
	var outBuf bytes.Buffer
	cmd.Stdout = &outBuf
	cmd.Stderr = &outBuf
	// Put the tool in its own process group so cancellation stops any
	// helpers it forks too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		msg := strings.TrimSpace(outBuf.String())
		if len(msg) > 2000 {
			msg = msg[len(msg)-2000:]
		}
		return fmt.Errorf("%s failed: %w: %s", filepath.Base(cmd.Path), err, msg)
	}
	return nil
}
