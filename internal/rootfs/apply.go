package rootfs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// Whiteout markers, as the OCI image layer specification defines them.
const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// progressStep is how many layer bytes pass between progress reports.
const progressStep = 1 << 20

// applyLayers applies img's layers, lowest first, into the directory root.
func applyLayers(ctx context.Context, src Source, img *image, root string, report func(Progress)) error {
	a, err := newApplier(root)
	if err != nil {
		return err
	}
	defer a.close()
	// The root has no tar entry in most images; a fixed time keeps the
	// output of one image identical from one conversion to the next.
	epoch := unix.Timespec{}
	if err := unix.UtimesNanoAt(a.rootFD, ".", []unix.Timespec{epoch, epoch}, 0); err != nil {
		return fmt.Errorf("set staging root time: %w", err)
	}

	var done, lastReport int64
	n := len(img.layers)
	for i, l := range img.layers {
		report(Progress{Phase: PhaseLayers, Layer: i + 1, Layers: n, Applied: done, Total: img.layerBytes})
		onRead := func(read int64) {
			if done+read-lastReport >= progressStep {
				lastReport = done + read
				report(Progress{Phase: PhaseLayers, Layer: i + 1, Layers: n, Applied: lastReport, Total: img.layerBytes})
			}
		}
		if err := a.applyLayer(ctx, src, l, img.diffIDs[i], onRead); err != nil {
			return fmt.Errorf("layer %d of %d (%s): %w", i+1, n, l.Digest, err)
		}
		done += l.Size
	}
	report(Progress{Phase: PhaseLayers, Layer: n, Layers: n, Applied: done, Total: img.layerBytes})
	return nil
}

// applier writes layer entries below root. Every path is resolved by the
// kernel with RESOLVE_IN_ROOT against rootFD, so a symlink from any layer
// (absolute, relative or "..") resolves inside root, as if root were /, and
// the last component of an entry is never followed: it is replaced.
type applier struct {
	root   string // canonical path of the staging root
	rootFD int
	buf    []byte

	// Per layer: the tar paths this layer has put in place (whiteouts and
	// opaque markers spare them), and the times each directory it touched
	// must end the layer with.
	written  map[string]bool
	dirTimes map[string][2]unix.Timespec
}

func newApplier(root string) (*applier, error) {
	canon, err := filepath.EvalSymlinks(root)
	if err != nil {
		return nil, fmt.Errorf("staging directory: %w", err)
	}
	fd, err := unix.Open(canon, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open staging directory %s: %w", canon, err)
	}
	return &applier{root: canon, rootFD: fd, buf: make([]byte, 1<<20)}, nil
}

func (a *applier) close() { unix.Close(a.rootFD) }

func (a *applier) applyLayer(ctx context.Context, src Source, desc v1.Descriptor, diffID digest.Digest, onRead func(int64)) error {
	rc, err := src.Blob(ctx, desc.Digest.String())
	if err != nil {
		return err
	}
	defer rc.Close()
	blobCheck := desc.Digest.Verifier()
	counted := &countingReader{ctx: ctx, r: rc, onRead: onRead}
	raw := bufio.NewReaderSize(io.TeeReader(counted, blobCheck), 1<<20)
	closeDec := func() {}
	defer func() { closeDec() }()
	// imageFault vouches for err, which the layer's content caused, as
	// ErrUnconvertible once the whole blob proves to be the image's own;
	// otherwise the stored copy is damaged or could not be read, which a
	// later conversion may not meet.
	imageFault := func(err error) error {
		closeDec() // a zstd decoder may still be reading raw
		closeDec = func() {}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return ctxErr
		}
		if counted.err == nil {
			_, _ = io.Copy(io.Discard, raw)
		}
		if counted.err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return ctxErr
			}
			return fmt.Errorf("read layer: %w", counted.err)
		}
		if !blobCheck.Verified() {
			return errCorruptLayer
		}
		return unconvertible(err)
	}
	dec, closeD, err := decompress(raw)
	if err != nil {
		return imageFault(err)
	}
	closeDec = closeD
	diffCheck := diffID.Verifier()
	tarStream := io.TeeReader(dec, diffCheck)

	a.written = map[string]bool{}
	a.dirTimes = map[string][2]unix.Timespec{}
	tr := tar.NewReader(tarStream)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return ctxErr
			}
			return imageFault(fmt.Errorf("read layer tar: %w", err))
		}
		if err := a.entry(tr, hdr); err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return ctxErr
			}
			err = fmt.Errorf("entry %q: %w", hdr.Name, err)
			if errors.Is(err, ErrUnconvertible) {
				return imageFault(err)
			}
			return err
		}
	}
	if err := a.finishDirs(); err != nil {
		return err
	}

	// The tar end marker may leave padding unread; hash all of it.
	if _, err := io.Copy(io.Discard, tarStream); err != nil {
		return imageFault(fmt.Errorf("read layer: %w", err))
	}
	if _, err := io.Copy(io.Discard, raw); err != nil {
		return fmt.Errorf("read layer: %w", err)
	}
	// A blob that matches its digest is the image's own: what is wrong
	// with it then is the image's fault.
	if !blobCheck.Verified() {
		return errCorruptLayer
	}
	if counted.n != desc.Size {
		return unconvertiblef("layer is %d bytes but its manifest says %d: the image is malformed", counted.n, desc.Size)
	}
	if !diffCheck.Verified() {
		return unconvertiblef("uncompressed layer does not match diff_id %s from the image config: the image is malformed", diffID)
	}
	return nil
}

// errCorruptLayer is a layer blob whose stored copy does not match its
// digest.
var errCorruptLayer = errors.New("layer content does not match its digest: the stored copy is corrupt; push the image again")

// decompress picks the decompressor by the stream's magic bytes, as
// containerd does: media types are not always honest about compression.
func decompress(br *bufio.Reader) (io.Reader, func(), error) {
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("open gzip layer: %w", err)
		}
		return zr, func() { zr.Close() }, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(1<<28))
		if err != nil {
			return nil, nil, fmt.Errorf("open zstd layer: %w", err)
		}
		return zr, zr.Close, nil
	}
	return br, func() {}, nil
}

// countingReader counts what it reads from the source and keeps the
// first error reading it (cancellation included), to tell a failed read
// from bad content.
type countingReader struct {
	ctx    context.Context
	r      io.Reader
	n      int64
	onRead func(int64)
	err    error
}

func (c *countingReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		c.err = err
		return 0, err
	}
	n, err := c.r.Read(p)
	if n > 0 {
		c.n += int64(n)
		c.onRead(c.n)
	}
	if err != nil && err != io.EOF && c.err == nil {
		c.err = err
	}
	return n, err
}

// cleanRel maps a tar path to a clean path relative to the root; ".." can
// never climb above it. The root itself is "".
func cleanRel(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

func (a *applier) entry(tr *tar.Reader, hdr *tar.Header) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	rel := cleanRel(hdr.Name)
	if rel == "" {
		if hdr.Typeflag != tar.TypeDir {
			return unconvertiblef("replaces the root directory with a non-directory")
		}
		a.written[""] = true
		return a.setMeta(a.rootFD, ".", "", hdr)
	}
	dir, base := path.Split(rel)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return a.whiteout(dir, base)
	}

	parent, err := a.mkdirAll(dir, hdr.ModTime)
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	if err := a.touch(parent); err != nil {
		return err
	}

	var existing unix.Stat_t
	exists := true
	if err := unix.Fstatat(parent, base, &existing, unix.AT_SYMLINK_NOFOLLOW); errors.Is(err, unix.ENOENT) {
		exists = false
	} else if err != nil {
		return err
	}

	if hdr.Typeflag == tar.TypeLink {
		return a.hardlink(parent, base, rel, hdr, exists, &existing)
	}

	mergeDir := exists && hdr.Typeflag == tar.TypeDir && existing.Mode&unix.S_IFMT == unix.S_IFDIR
	if exists && !mergeDir {
		if err := removeAt(parent, base); err != nil {
			return err
		}
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		if !mergeDir {
			if err := unix.Mkdirat(parent, base, 0o700); err != nil {
				return fmt.Errorf("create directory: %w", err)
			}
		}
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont, '\x00':
		if err := a.writeFile(parent, base, tr); err != nil {
			return err
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, parent, base); err != nil {
			return fmt.Errorf("create symlink: %w", err)
		}
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		mode := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(parent, base, mode|0o600, int(dev)); err != nil {
			return fmt.Errorf("create device node or fifo: %w", err)
		}
	default:
		return unconvertiblef("unsupported tar entry type %q", hdr.Typeflag)
	}
	a.written[rel] = true
	return a.setMeta(parent, base, rel, hdr)
}

func (a *applier) writeFile(parent int, base string, r io.Reader) error {
	fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create file: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	lr := &readErrReader{r: r}
	if _, err := io.CopyBuffer(f, lr, a.buf); err != nil {
		f.Close()
		if lr.err != nil {
			// Truncated or undecodable content; applyLayer tells that
			// from a failed read of the blob.
			return unconvertiblef("read file content: %w", lr.err)
		}
		return fmt.Errorf("write file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write file: %w", err)
	}
	return nil
}

// readErrReader keeps the error its reader returned, to tell reading a
// layer entry from writing it out.
type readErrReader struct {
	r   io.Reader
	err error
}

func (l *readErrReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	if err != nil && err != io.EOF {
		l.err = err
	}
	return n, err
}

// missingLinkTarget is the error of a hard link whose target could not be
// found; a target missing from the tree is the layer's fault.
func missingLinkTarget(name string, err error) error {
	err = fmt.Errorf("hard link target %q: %w (the target must come earlier in this or a lower layer)", name, err)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
		return unconvertible(err)
	}
	return err
}

// hardlink links base to an entry already in the tree (from this or a
// lower layer). The target's own last component is not followed, so a link
// to a symlink links the symlink, as tar does.
func (a *applier) hardlink(parent int, base, rel string, hdr *tar.Header, exists bool, existing *unix.Stat_t) error {
	target := cleanRel(hdr.Linkname)
	if target == "" {
		return unconvertiblef("hard link to the root directory")
	}
	tdir, tbase := path.Split(target)
	tparent, err := a.resolveDir(tdir)
	if err != nil {
		return missingLinkTarget(hdr.Linkname, err)
	}
	defer unix.Close(tparent)
	var tst unix.Stat_t
	if err := unix.Fstatat(tparent, tbase, &tst, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return missingLinkTarget(hdr.Linkname, err)
	}
	if tst.Mode&unix.S_IFMT == unix.S_IFDIR {
		return unconvertiblef("hard link target %q is a directory", hdr.Linkname)
	}
	if exists && existing.Dev == tst.Dev && existing.Ino == tst.Ino {
		a.written[rel] = true
		return nil
	}
	if exists {
		if err := removeAt(parent, base); err != nil {
			return err
		}
	}
	if err := unix.Linkat(tparent, tbase, parent, base, 0); err != nil {
		return fmt.Errorf("hard link to %q: %w", hdr.Linkname, err)
	}
	a.written[rel] = true
	return nil
}

// setMeta gives a new entry its owner, xattrs, mode and times, in the order
// that keeps each: chown clears setuid/setgid and file capabilities, so it
// goes first.
func (a *applier) setMeta(parent int, base, rel string, hdr *tar.Header) error {
	if err := unix.Fchownat(parent, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set owner %d:%d: %w", hdr.Uid, hdr.Gid, err)
	}
	isLink := hdr.Typeflag == tar.TypeSymlink
	var names []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	for _, k := range names {
		name := strings.TrimPrefix(k, "SCHILY.xattr.")
		err := unix.Lsetxattr(procPath(parent, base), name, []byte(hdr.PAXRecords[k]), 0)
		// The kernel refuses user.* xattrs on symlinks; Docker drops
		// those too rather than failing the image.
		if err != nil && !(isLink && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOTSUP))) {
			return fmt.Errorf("set xattr %s: %w", name, err)
		}
	}
	if !isLink {
		if err := unix.Fchmodat(parent, base, uint32(hdr.Mode)&0o7777, 0); err != nil {
			return fmt.Errorf("set mode %o: %w", hdr.Mode&0o7777, err)
		}
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	ts := [2]unix.Timespec{timespec(atime), timespec(hdr.ModTime)}
	if hdr.Typeflag == tar.TypeDir {
		// Entries below it would change its mtime again; set it when the
		// layer ends.
		real, err := a.realRel(parent)
		if err != nil {
			return err
		}
		if base != "." {
			real = path.Join(real, base)
		}
		a.dirTimes[real] = ts
		return nil
	}
	if err := unix.UtimesNanoAt(parent, base, ts[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func timespec(t time.Time) unix.Timespec {
	return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
}

// whiteout handles a .wh. marker in directory dir (relative, with a
// trailing slash or empty).
func (a *applier) whiteout(dir, base string) error {
	if base == whiteoutOpaque {
		return a.opaque(dir)
	}
	if strings.HasPrefix(base, whiteoutMeta) {
		return nil // other AUFS metadata carries nothing for the tree
	}
	name := strings.TrimPrefix(base, whiteoutPrefix)
	if name == "" || name == "." || name == ".." {
		return unconvertiblef("whiteout %q names no file", base)
	}
	// A whiteout hides lower layers only, never what its own layer added.
	if a.written[dir+name] {
		return nil
	}
	parent, err := a.resolveDir(dir)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	if err := a.touch(parent); err != nil {
		return err
	}
	return removeAt(parent, name)
}

// opaque empties dir of everything from lower layers, keeping what this
// layer has already put there.
func (a *applier) opaque(dir string) error {
	rel := strings.TrimSuffix(dir, "/")
	fd, err := a.resolveDir(rel)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return a.clearLower(fd, rel)
}

func (a *applier) clearLower(fd int, rel string) error {
	if err := a.touch(fd); err != nil {
		return err
	}
	d, err := os.Open(procPath(fd, "."))
	if err != nil {
		return err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		p := path.Join(rel, n)
		if !a.written[p] {
			if err := removeAt(fd, n); err != nil {
				return err
			}
			continue
		}
		sub, err := unix.Openat(fd, n, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			continue
		}
		if err != nil {
			return err
		}
		err = a.clearLower(sub, p)
		unix.Close(sub)
		if err != nil {
			return err
		}
	}
	return nil
}

// resolveDir opens directory rel (relative to the root) for use as the
// dirfd of *at calls, resolving symlinks as if the root were /.
func (a *applier) resolveDir(rel string) (int, error) {
	rel = strings.TrimSuffix(rel, "/")
	if rel == "" {
		rel = "."
	}
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	}
	for {
		fd, err := unix.Openat2(a.rootFD, rel, how)
		switch {
		case err == nil:
			return fd, nil
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ENOTDIR):
			return -1, unconvertiblef("parent %q: a path component is not a directory: %w", rel, err)
		default:
			return -1, fmt.Errorf("parent %q: %w", rel, err)
		}
	}
}

// mkdirAll resolves dir, creating missing directories (root-owned, 0755,
// with the entry's mtime, as Docker and containerd do).
func (a *applier) mkdirAll(dir string, mtime time.Time) (int, error) {
	dir = strings.TrimSuffix(dir, "/")
	fd, err := a.resolveDir(dir)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	parent, err := a.resolveDir("")
	if err != nil {
		return -1, err
	}
	comps := strings.Split(dir, "/")
	for i, c := range comps {
		prefix := strings.Join(comps[:i+1], "/")
		next, err := a.resolveDir(prefix)
		if errors.Is(err, unix.ENOENT) {
			err = a.touch(parent)
			if err == nil {
				err = unix.Mkdirat(parent, c, 0o755)
				if errors.Is(err, unix.EEXIST) {
					err = unconvertiblef("parent %q is a symlink to a directory that does not exist", prefix)
				}
			}
			if err == nil {
				ts := timespec(mtime)
				err = unix.UtimesNanoAt(parent, c, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
			}
			if err == nil {
				a.written[prefix] = true
				next, err = a.resolveDir(prefix)
			}
		}
		unix.Close(parent)
		if err != nil {
			return -1, err
		}
		parent = next
	}
	return parent, nil
}

// touch remembers the times of directory fd before this layer changes its
// entries, so they can be put back unless the layer sets them itself.
func (a *applier) touch(fd int) error {
	real, err := a.realRel(fd)
	if err != nil {
		return err
	}
	if _, ok := a.dirTimes[real]; ok {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	a.dirTimes[real] = [2]unix.Timespec{st.Atim, st.Mtim}
	return nil
}

// realRel is the symlink-free path of directory fd relative to the root.
func (a *applier) realRel(fd int) (string, error) {
	p, err := os.Readlink(procPath(fd, ""))
	if err != nil {
		return "", err
	}
	if p == a.root {
		return "", nil
	}
	rel, ok := strings.CutPrefix(p, a.root+"/")
	if !ok {
		return "", fmt.Errorf("directory %s resolved outside the staging root", p)
	}
	return rel, nil
}

// finishDirs gives every directory the layer touched its final times.
// Paths are resolved again without following any symlink: a later entry of
// the layer may have replaced a directory with one.
func (a *applier) finishDirs() error {
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV,
	}
	for real, ts := range a.dirTimes {
		dir, base := path.Split(real)
		if base == "" {
			base = "."
		}
		if dir == "" {
			dir = "."
		}
		fd, err := unix.Openat2(a.rootFD, dir, how)
		if err != nil {
			continue // gone or replaced later in the layer
		}
		var st unix.Stat_t
		if unix.Fstatat(fd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = unix.UtimesNanoAt(fd, base, ts[:], unix.AT_SYMLINK_NOFOLLOW)
		}
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("set times of directory %q: %w", real, err)
		}
	}
	return nil
}

// removeAt removes name (a whole tree if a directory) from directory fd
// without following symlinks.
func removeAt(fd int, name string) error {
	if err := os.RemoveAll(procPath(fd, name)); err != nil {
		return fmt.Errorf("remove %q: %w", name, err)
	}
	return nil
}

// procPath names an entry of directory fd through /proc, for calls that
// have no *at form (xattrs, recursive removal). Only the fd's directory is
// reached through the magic link; name itself is not followed by callers.
func procPath(fd int, name string) string {
	p := "/proc/self/fd/" + strconv.Itoa(fd)
	if name != "" {
		p += "/" + name
	}
	return p
}
