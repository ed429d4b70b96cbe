package buildcontext

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// Limits bound what Receive accepts. A zero field means "no limit"; the
// server is expected to always set all three from its config.
type Limits struct {
	MaxBytes             int64 // bytes read from the upload, as sent (compressed)
	MaxUncompressedBytes int64 // bytes of the tar stream after decompression
	MaxEntries           int   // archive entries, and paths in the extracted tree
}

// Config keys named in limit errors, so the person who hits a limit knows
// what the operator has to change.
const (
	keyMaxBytes             = "context.max_bytes"
	keyMaxUncompressedBytes = "context.max_uncompressed_bytes"
	keyMaxEntries           = "context.max_entries"
)

// Formats Receive recognises, as reported in Info.Format.
const (
	FormatTar  = "tar"
	FormatGzip = "tar.gz"
	FormatZstd = "tar.zst"
)

// Info describes a context that Receive accepted.
type Info struct {
	Bytes             int64  // bytes read from the upload (compressed size)
	UncompressedBytes int64  // bytes of the decompressed tar stream
	Entries           int    // archive entries (headers), including directories and links
	Format            string // FormatTar, FormatGzip or FormatZstd
	// Hash is the canonical context hash, "sha256:<hex>"; see contextHash
	// for exactly what it covers. Dedup keys on it: change it only by
	// bumping hashVersion.
	Hash string
	// Excludes are the .dockerignore patterns that Hash honoured (nil when
	// the context has none). The files they exclude are still on disk:
	// BuildKit's Dockerfile frontend reads the same .dockerignore and
	// applies them itself. If the Dockerfile is solved from inside the
	// context directory and a "<Dockerfile>.dockerignore" sits next to it,
	// BuildKit prefers that file and Hash no longer describes what the build
	// sees; ForDockerfile then gives the Info that does.
	Excludes []string
	// IgnoreFile is the ignore file Hash and Excludes honour, "" if none.
	IgnoreFile string

	// The received tree, for ForDockerfile.
	nodes map[string]*node
	dir   string
}

// ForDockerfile is in for a build whose Dockerfile is dockerfile (a clean
// path inside the context): BuildKit's Dockerfile frontend then prefers
// "<dockerfile>.dockerignore" to the root .dockerignore, and so must the
// hash, or two contexts differing only in files the build does see would
// hash equal. Without such a file it returns in unchanged.
func (in Info) ForDockerfile(dockerfile string) (Info, error) {
	name := dockerfile + ".dockerignore"
	if n := in.nodes[name]; n == nil || name == ignoreFileName {
		return in, nil
	}
	root, err := os.OpenRoot(in.dir)
	if err != nil {
		return Info{}, serverFault(err, "opening the build context directory failed")
	}
	defer root.Close()
	x := &extractor{root: root, nodes: in.nodes}
	excludes, err := x.readIgnoreFile(name)
	if err != nil {
		return Info{}, err
	}
	ig, err := newIgnorer(excludes)
	if err != nil {
		return Info{}, badInput("%v; fix the context's %s", err, name)
	}
	hash, err := contextHash(in.nodes, ig)
	if err != nil {
		return Info{}, badInput("applying the context's %s failed: %v; fix the pattern", name, err)
	}
	in.Hash, in.Excludes, in.IgnoreFile = hash, excludes, name
	return in, nil
}

const (
	// Linux limits; checking them ourselves turns ENAMETOOLONG on the
	// server into a 400 that names the entry.
	maxPathLen      = 4096
	maxComponentLen = 255
	// A zstd frame may demand a window of up to 3.75 TB; 128 MiB covers
	// `zstd --ultra -22` and `--long=27` while bounding what one upload can
	// make the server allocate.
	maxZstdWindow = 128 << 20
	// Every path operation through os.Root opens each directory on the
	// way, so depth multiplies the cost of every entry. Real contexts
	// (node_modules included) stay far below this.
	maxDepth = 256
	// Directories that the archive only implies get the usual default.
	impliedDirMode = 0o755
)

// Receive reads one build context from r in a single streaming pass and
// extracts it into dir, which must not exist or must be empty; Receive
// creates it with mode 0700 so no other local user can reach into an
// upload while it is being checked.
//
// The upload may be a tar, a gzip-compressed tar or a zstd-compressed tar;
// the format is recognised by its magic bytes. Every entry is validated
// before anything is written: absolute paths, ".." components, hard links
// to anything but a regular file extracted earlier, symlinks whose target
// is absolute or resolves outside the context (also through chains of other
// symlinks), entries beneath a symlink, directories replaced by other types,
// and device nodes, FIFOs and sockets are all refused. Extraction goes
// through an os.Root and creates files with O_EXCL, so even a bug in these
// checks cannot write outside dir or through a link.
//
// Modes keep their permission bits and the sticky bit on directories;
// setuid and setgid are dropped, because the server extracts as its own
// (often root) user and a setuid-root file from an upload is a local
// privilege escalation waiting for a traversable directory. Owners are
// ignored. Mtimes of files and directories are applied where the
// filesystem can store them (best effort: nothing depends on them, but
// COPY preserves them into image layers). Paths are limited to 4096 bytes,
// 255 bytes per component and 256 levels of nesting.
//
// On any error, dir is removed (unless it already existed and was not empty:
// then nothing is touched) and the error is an *Error. Canceling ctx stops
// the read promptly even when r blocks; a Read on r that was in flight keeps
// running in the background until r returns, so r must not be reused.
func Receive(ctx context.Context, r io.Reader, dir string, lim Limits) (info Info, err error) {
	if err := ctx.Err(); err != nil {
		return Info{}, canceled(err)
	}
	if err := makeTargetDir(dir); err != nil {
		return Info{}, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		_ = removeTree(dir)
		return Info{}, serverFault(err, "opening the build context directory failed")
	}
	x := &extractor{
		ctx:   ctx,
		root:  root,
		lim:   lim,
		nodes: map[string]*node{".": {typ: typeDir}},
		buf:   make([]byte, 128<<10),
	}
	x.src = &sourceReader{ctx: ctx, r: r, buf: make([]byte, 64<<10), res: make(chan sourceRead, 1)}
	x.wire = &limitCounter{r: x.src, limit: lim.MaxBytes}
	defer func() {
		x.closeSubRoot()
		closeErr := root.Close()
		if err == nil && closeErr != nil {
			err = serverFault(closeErr, "closing the build context directory failed")
		}
		if err != nil {
			err = x.classify(err)
			_ = removeTree(dir)
			info = Info{}
		}
	}()
	return x.run()
}

type extractor struct {
	ctx    context.Context
	root   *os.Root
	lim    Limits
	src    *sourceReader
	wire   *limitCounter // compressed bytes
	raw    *limitCounter // decompressed tar stream
	format string
	nodes  map[string]*node
	inodes int   // last inode id handed out
	data   int64 // logical file content written (sparse files can exceed the tar stream)
	buf    []byte

	subDir  string   // directory of the last entry, see parentRoot
	subRoot *os.Root // nil or a handle on subDir

	// blobs, when set, provides file contents by digest (Materialize);
	// digest is the current entry's.
	blobs  BlobSource
	digest string
}

func (x *extractor) run() (Info, error) {
	br := bufio.NewReaderSize(x.wire, 64<<10)
	dec, closeDec, err := x.openDecompressor(br)
	if err != nil {
		return Info{}, err
	}
	defer closeDec()
	x.raw = &limitCounter{r: dec, limit: x.lim.MaxUncompressedBytes}
	tr := tar.NewReader(x.raw)

	entries := 0
	for {
		if err := x.ctx.Err(); err != nil {
			return Info{}, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // GODEBUG=tarinsecurepath=0; entryPath gives the better message
		}
		if err != nil {
			return Info{}, err
		}
		entries++
		if x.lim.MaxEntries > 0 && entries > x.lim.MaxEntries {
			return Info{}, x.tooManyEntries()
		}
		if err := x.entry(hdr, tr); err != nil {
			return Info{}, err
		}
	}

	// Read to the very end: a gzip or zstd checksum is only verified at the
	// end of its stream, padding and trailing bytes still count against the
	// limits, and the caller gets an exact byte count.
	if _, err := io.CopyBuffer(io.Discard, x.raw, x.buf); err != nil {
		return Info{}, err
	}
	if _, err := io.CopyBuffer(io.Discard, br, x.buf); err != nil {
		return Info{}, err
	}
	info, err := x.finish()
	if err != nil {
		return Info{}, err
	}
	info.Bytes, info.UncompressedBytes, info.Entries, info.Format = x.wire.n, x.raw.n, entries, x.format
	return info, nil
}

// finish checks the complete tree, hashes it and applies directory modes.
func (x *extractor) finish() (Info, error) {
	if err := x.checkSymlinkChains(); err != nil {
		return Info{}, err
	}
	excludes, err := x.readIgnoreFile(ignoreFileName)
	if err != nil {
		return Info{}, err
	}
	return x.seal(excludes)
}

// seal hashes the complete tree honouring excludes (the context's
// .dockerignore patterns, nil without one) and applies directory modes.
func (x *extractor) seal(excludes []string) (Info, error) {
	ignoreFile := ""
	if excludes != nil {
		ignoreFile = ignoreFileName
	}
	ig, err := newIgnorer(excludes)
	if err != nil {
		return Info{}, badInput("%v; fix the context's %s", err, ignoreFileName)
	}
	hash, err := contextHash(x.nodes, ig)
	if err != nil {
		return Info{}, badInput("applying the context's %s failed: %v; fix the pattern", ignoreFileName, err)
	}
	if err := x.finishDirs(); err != nil {
		return Info{}, err
	}
	return Info{
		Hash:       hash,
		Excludes:   excludes,
		IgnoreFile: ignoreFile,
		nodes:      x.nodes,
		dir:        x.root.Name(),
	}, nil
}

var (
	magicGzip  = []byte{0x1f, 0x8b}
	magicZstd  = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicBzip2 = []byte("BZh")
	magicXz    = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	magicZip   = []byte("PK\x03\x04")
)

func (x *extractor) openDecompressor(br *bufio.Reader) (io.Reader, func(), error) {
	magic, err := br.Peek(len(magicXz))
	if len(magic) == 0 {
		if errors.Is(err, io.EOF) {
			return nil, nil, badInput("the build context upload is empty; send a tar, tar.gz or tar.zst of the context directory")
		}
		return nil, nil, err
	}
	unsupported := func(what string) error {
		return badInput("the build context is compressed with %s, which kiln does not accept; send a tar, tar.gz or tar.zst of the context directory", what)
	}
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		x.format = FormatGzip
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, err
		}
		return zr, func() { _ = zr.Close() }, nil
	case bytes.HasPrefix(magic, magicZstd):
		x.format = FormatZstd
		zr, err := zstd.NewReader(br,
			zstd.WithDecoderConcurrency(1), // decode inline: no goroutines to leak or to outlive ctx
			zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(maxZstdWindow),
			zstd.WithDecoderMaxMemory(maxZstdWindow),
		)
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	case bytes.HasPrefix(magic, magicBzip2):
		return nil, nil, unsupported("bzip2")
	case bytes.HasPrefix(magic, magicXz):
		return nil, nil, unsupported("xz")
	case bytes.HasPrefix(magic, magicZip):
		return nil, nil, badInput("the build context is a zip file, which kiln does not accept; send a tar, tar.gz or tar.zst of the context directory")
	}
	// Anything else must be a tar; archive/tar's header checksum rejects
	// garbage on the first block.
	x.format = FormatTar
	return br, func() {}, nil
}

// classify turns whatever stopped the pass into the *Error the client sees.
// Limits and cancellation are checked first because decompressors and
// archive/tar wrap or replace the reader errors that signal them.
func (x *extractor) classify(err error) *Error {
	if ctxErr := x.ctx.Err(); ctxErr != nil {
		return canceled(ctxErr)
	}
	if x.wire != nil && x.wire.over {
		return tooLarge("context is larger than the %s limit (%s); exclude large files with .dockerignore, or ask the kiln operator to raise %s",
			formatBytes(x.lim.MaxBytes), keyMaxBytes, keyMaxBytes)
	}
	if x.raw != nil && x.raw.over {
		return x.tooLargeUncompressed()
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if x.src != nil && x.src.srcErr != nil {
		return &Error{Class: errdefs.ErrInvalid, Msg: fmt.Sprintf("reading the build context upload failed (%v); retry the upload", x.src.srcErr), err: x.src.srcErr}
	}
	format := x.format
	if format == "" {
		format = "tar, tar.gz or tar.zst"
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return &Error{Class: errdefs.ErrInvalid, Msg: fmt.Sprintf("the build context ends unexpectedly: the upload is truncated or is not a valid %s archive; re-send the complete archive", format), err: err}
	}
	return &Error{Class: errdefs.ErrInvalid, Msg: fmt.Sprintf("the build context is not a valid %s archive (%v); send a tar, tar.gz or tar.zst of the context directory", format, err), err: err}
}

func (x *extractor) tooLargeUncompressed() *Error {
	return tooLarge("context is larger than the %s limit when uncompressed (%s); exclude large files with .dockerignore, or ask the kiln operator to raise %s",
		formatBytes(x.lim.MaxUncompressedBytes), keyMaxUncompressedBytes, keyMaxUncompressedBytes)
}

func (x *extractor) tooManyEntries() *Error {
	return tooLarge("context has more than %d files and directories, the limit (%s); exclude generated or vendored directories with .dockerignore, or ask the kiln operator to raise %s",
		x.lim.MaxEntries, keyMaxEntries, keyMaxEntries)
}

// entry validates one archive header and materialises it.
func (x *extractor) entry(hdr *tar.Header, body io.Reader) error {
	var typ nodeType
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		return nil // PAX defaults for later entries; archive/tar already applied them
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse:
		typ = typeFile
	case tar.TypeDir:
		typ = typeDir
	case tar.TypeSymlink:
		typ = typeSymlink
	case tar.TypeLink:
		typ = typeHardlink
	case tar.TypeChar, tar.TypeBlock:
		return badInput("context entry %q is a device node; a build context may only contain files, directories and links: remove it or add it to .dockerignore", hdr.Name)
	case tar.TypeFifo:
		return badInput("context entry %q is a named pipe (FIFO); a build context may only contain files, directories and links: remove it or add it to .dockerignore", hdr.Name)
	default:
		return badInput("context entry %q has tar type %q, which kiln does not support; a build context may only contain files, directories and links", hdr.Name, string(hdr.Typeflag))
	}

	name, err := entryPath(hdr.Name)
	if err != nil {
		return err
	}
	if name == "." {
		if typ == typeDir {
			return nil // "./": the root is ours, keep its 0700
		}
		return badInput("context entry %q would replace the context root with a %s; re-create the archive from inside the context directory", hdr.Name, typ)
	}
	if err := x.makeParents(name, hdr.Name); err != nil {
		return err
	}
	dirRoot, base, err := x.parentRoot(name)
	if err != nil {
		return x.fsFault(err, hdr.Name)
	}
	if old := x.nodes[name]; old != nil {
		if old.typ == typeDir {
			if typ != typeDir {
				return badInput("context entry %q would replace a directory with a %s; the archive has conflicting entries for this path, re-create it", hdr.Name, typ)
			}
		} else {
			// Later entries win, as with tar(1); removing first means the
			// new one never writes through whatever was there.
			if err := dirRoot.Remove(base); err != nil {
				return x.fsFault(err, hdr.Name)
			}
			delete(x.nodes, name)
		}
	}
	if x.lim.MaxEntries > 0 && len(x.nodes) >= x.lim.MaxEntries+1 && x.nodes[name] == nil {
		return x.tooManyEntries()
	}

	mode := uint32(hdr.Mode) & 0o777
	switch typ {
	case typeDir:
		if hdr.Mode&0o1000 != 0 {
			mode |= 0o1000
		}
		if x.nodes[name] == nil {
			if err := dirRoot.Mkdir(base, 0o700); err != nil {
				return x.fsFault(err, hdr.Name)
			}
		}
		x.nodes[name] = &node{typ: typeDir, mode: mode, mtime: hdr.ModTime}
		return nil
	case typeFile:
		return x.writeFile(dirRoot, base, name, hdr, mode, body)
	case typeSymlink:
		if err := checkSymlinkTarget(name, hdr.Linkname, hdr.Name); err != nil {
			return err
		}
		if err := dirRoot.Symlink(hdr.Linkname, base); err != nil {
			return x.fsFault(err, hdr.Name)
		}
		x.nodes[name] = &node{typ: typeSymlink, link: hdr.Linkname}
		return nil
	default: // typeHardlink
		return x.link(name, hdr)
	}
}

func (x *extractor) writeFile(dirRoot *os.Root, base, name string, hdr *tar.Header, mode uint32, body io.Reader) error {
	if hdr.Size < 0 {
		return badInput("context entry %q has a negative size; re-create the archive", hdr.Name)
	}
	x.data += hdr.Size
	if x.lim.MaxUncompressedBytes > 0 && x.data > x.lim.MaxUncompressedBytes {
		return x.tooLargeUncompressed()
	}
	if x.blobs != nil {
		return x.linkBlob(dirRoot, base, name, hdr, mode)
	}
	// O_EXCL: the path was just cleared, so anything there now (a symlink
	// above all) is a reason to stop, not something to open.
	f, err := dirRoot.OpenFile(base, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return x.fsFault(err, hdr.Name)
	}
	h := sha256.New()
	var copyErr error
	if isSparse(hdr) {
		// Holes stay holes on disk; the hash still covers them as zeros.
		sw := &sparseWriter{ctx: x.ctx, f: f, h: h}
		if _, copyErr = io.CopyBuffer(sw, body, x.buf); copyErr == nil {
			copyErr = sw.finish()
		}
	} else {
		_, copyErr = io.CopyBuffer(io.MultiWriter(f, h), body, x.buf)
	}
	if copyErr == nil {
		copyErr = f.Chmod(os.FileMode(mode))
	}
	closeErr := f.Close()
	if copyErr != nil {
		var pe *fs.PathError
		if errors.As(copyErr, &pe) {
			return x.fsFault(copyErr, hdr.Name)
		}
		return copyErr // from the stream: classify explains it
	}
	if closeErr != nil {
		return x.fsFault(closeErr, hdr.Name)
	}
	x.inodes++
	n := &node{typ: typeFile, mode: mode, ino: x.inodes}
	h.Sum(n.sum[:0])
	x.nodes[name] = n
	// The archive's mtime is replaced by one made of the content: BuildKit
	// resends a file on a warm transfer only when its size or mtime
	// changed, and archives (reproducible ones carry mtime 0) say nothing
	// reliable about content.
	t := ContentTime(n.sum)
	if err := dirRoot.Chtimes(base, t, t); err != nil {
		return x.fsFault(err, hdr.Name)
	}
	return nil
}

func (x *extractor) link(name string, hdr *tar.Header) error {
	if hdr.Linkname == "" || strings.HasPrefix(hdr.Linkname, "/") || slices.Contains(strings.Split(hdr.Linkname, "/"), "..") {
		return badInput("context entry %q is a hard link to %q, which is outside the context; hard links must point to a file inside the context", hdr.Name, hdr.Linkname)
	}
	target := path.Clean(hdr.Linkname)
	t := x.nodes[target]
	if t == nil || (t.typ != typeFile && t.typ != typeHardlink) {
		return badInput("context entry %q is a hard link to %q, which is not a regular file that appears earlier in the archive; re-create the archive (kiln build does this correctly)", hdr.Name, hdr.Linkname)
	}
	if err := x.root.Link(target, name); err != nil {
		return x.fsFault(err, hdr.Name)
	}
	x.nodes[name] = &node{typ: typeHardlink, mode: t.mode, sum: t.sum, ino: t.ino}
	return nil
}

// parentRoot returns an os.Root for name's directory and name's last
// component. Every os.Root operation opens each directory on its path, so
// reusing the root of the directory the previous entry went to (archives
// are grouped by directory) keeps per-entry cost independent of depth.
// Directories are never removed or replaced during extraction, so a cached
// handle always refers to the directory its path names.
func (x *extractor) parentRoot(name string) (*os.Root, string, error) {
	d, base := path.Dir(name), path.Base(name)
	if d == "." {
		return x.root, base, nil
	}
	if x.subRoot != nil && x.subDir == d {
		return x.subRoot, base, nil
	}
	r, err := x.root.OpenRoot(d)
	if err != nil {
		return nil, "", err
	}
	x.closeSubRoot()
	x.subDir, x.subRoot = d, r
	return r, base, nil
}

func (x *extractor) closeSubRoot() {
	if x.subRoot != nil {
		_ = x.subRoot.Close()
		x.subRoot, x.subDir = nil, ""
	}
}

// makeParents checks the ancestors of name and creates the ones the
// archive only implies. An ancestor that is a symlink stops the upload:
// writing beneath it would follow it.
//
// Every recorded path's ancestors are recorded directories, so only the
// deepest recorded ancestor needs checking; that keeps the cost linear in
// the path length instead of quadratic.
func (x *extractor) makeParents(name, raw string) error {
	var missing []string
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		n := x.nodes[p]
		if n == nil {
			missing = append(missing, p)
			continue
		}
		switch n.typ {
		case typeDir:
		case typeSymlink:
			return badInput("context entry %q would be written through the symlink %q; an archive may not place entries beneath a symlink, re-create it", raw, p)
		default:
			return badInput("context entry %q needs %q to be a directory, but the archive made it a %s; re-create the archive", raw, p, n.typ)
		}
		break
	}
	for i := len(missing) - 1; i >= 0; i-- {
		p := missing[i]
		if x.lim.MaxEntries > 0 && len(x.nodes) >= x.lim.MaxEntries+1 {
			return x.tooManyEntries()
		}
		if err := x.root.Mkdir(p, 0o700); err != nil {
			return x.fsFault(err, raw)
		}
		x.nodes[p] = &node{typ: typeDir, mode: impliedDirMode}
	}
	return nil
}

// entryPath validates an archive path and returns it cleaned, "." for the
// root.
func entryPath(raw string) (string, error) {
	if raw == "" {
		return "", badInput("the build context archive has an entry with an empty name; re-create the archive")
	}
	if strings.HasPrefix(raw, "/") {
		return "", badInput("context entry %q has an absolute path; entries must be relative to the context root (create the archive from inside the context directory, e.g. \"tar -C DIR -czf - .\")", raw)
	}
	if len(raw) > maxPathLen {
		return "", badInput("context entry %q... has a path longer than %d bytes; shorten it or add it to .dockerignore", raw[:64], maxPathLen)
	}
	comps := strings.Split(raw, "/")
	if len(comps) > maxDepth {
		return "", badInput("context entry %q... is nested more than %d directories deep; flatten it or add it to .dockerignore", raw[:min(len(raw), 64)], maxDepth)
	}
	for _, c := range comps {
		if c == ".." {
			return "", badInput("context entry %q escapes the context root; entries must not contain \"..\", re-create the archive from inside the context directory", raw)
		}
		if len(c) > maxComponentLen {
			return "", badInput("context entry %q has a path component longer than %d bytes; shorten it or add it to .dockerignore", raw, maxComponentLen)
		}
	}
	return path.Clean(raw), nil
}

// checkSymlinkTarget refuses targets that leave the context on their own.
// Chains through other symlinks are checked once the tree is complete.
func checkSymlinkTarget(name, target, raw string) error {
	if target == "" {
		return badInput("context entry %q is a symlink with an empty target; remove it", raw)
	}
	if len(target) >= maxPathLen {
		return badInput("context entry %q is a symlink whose target is longer than %d bytes; remove it", raw, maxPathLen-1)
	}
	if strings.HasPrefix(target, "/") {
		return badInput("context entry %q is a symlink to the absolute path %q, which escapes the context root; make it a relative link to a path inside the context, or add it to .dockerignore", raw, target)
	}
	if resolved := path.Join(path.Dir(name), target); resolved == ".." || strings.HasPrefix(resolved, "../") {
		return badInput("context entry %q is a symlink to %q, which points outside the context root; make it point inside the context, or add it to .dockerignore", raw, target)
	}
	return nil
}

// checkSymlinkChains resolves every symlink against the finished tree the
// way the kernel would, following other symlinks, and refuses any that
// climbs above the root at any step: "a/up" -> ".." is harmless alone, but
// "b" -> "a/up/.." then leaves the context.
func (x *extractor) checkSymlinkChains() error {
	var links []string
	for p, n := range x.nodes {
		if n.typ == typeSymlink {
			links = append(links, p)
		}
	}
	if len(links) == 0 {
		return nil
	}
	slices.Sort(links) // report the same entry every time
	t := newTrie(x.nodes)
	for _, p := range links {
		l := t.lookup(p)
		if l == nil || t.resolveLink(l).status == resEscapes {
			return badInput("context entry %q is a symlink to %q, which resolves outside the context root through other symlinks; make it point inside the context, or add it to .dockerignore", p, x.nodes[p].link)
		}
	}
	return nil
}

// trie is the extracted tree as linked nodes, so resolving a symlink costs
// one map lookup per component and each symlink is resolved only once,
// however many chains run through it. Path-string lookups would make a
// hostile archive of long, deep, mutually referencing links quadratic.
type trie struct{ root *tnode }

type tnode struct {
	parent *tnode
	kids   map[string]*tnode
	n      *node
	state  uint8 // symlinks: 0 unresolved, 1 resolving, 2 resolved
	res    resolution
}

type resolution struct {
	status  int
	at      *tnode // deepest existing node reached
	missing int    // components below at that do not exist
}

const (
	resOK      = iota
	resEscapes // climbed above the root
	resDead    // ENOTDIR or a loop: the kernel stops, nothing is reached
)

func newTrie(nodes map[string]*node) *trie {
	t := &trie{root: &tnode{n: nodes["."], kids: map[string]*tnode{}}}
	// Parents sort before their children, so each parent exists in time.
	paths := make([]string, 0, len(nodes))
	for p := range nodes {
		if p != "." {
			paths = append(paths, p)
		}
	}
	slices.Sort(paths)
	for _, p := range paths {
		parent := t.root
		if d := path.Dir(p); d != "." {
			parent = t.lookup(d)
		}
		if parent == nil || parent.kids == nil {
			continue // cannot happen: recorded paths have recorded directory parents
		}
		tn := &tnode{parent: parent, n: nodes[p]}
		if tn.n.typ == typeDir {
			tn.kids = map[string]*tnode{}
		}
		parent.kids[path.Base(p)] = tn
	}
	return t
}

func (t *trie) lookup(p string) *tnode {
	cur := t.root
	for _, c := range strings.Split(p, "/") {
		if cur == nil {
			return nil
		}
		cur = cur.kids[c]
	}
	return cur
}

func (t *trie) resolveLink(l *tnode) resolution {
	switch l.state {
	case 1:
		return resolution{status: resDead} // a loop: ELOOP
	case 2:
		return l.res
	}
	l.state = 1
	l.res = t.resolve(l.parent, l.n.link)
	l.state = 2
	return l.res
}

// resolve walks target from dir. Components below a missing one are
// followed lexically: the strictest reading, since the kernel would stop
// with ENOENT anyway.
func (t *trie) resolve(dir *tnode, target string) resolution {
	at, missing := dir, 0
	comps := strings.Split(target, "/")
	for i, c := range comps {
		switch {
		case c == "" || c == ".":
			continue
		case c == "..":
			if missing > 0 {
				missing--
			} else if at.parent == nil {
				return resolution{status: resEscapes}
			} else {
				at = at.parent
			}
			continue
		case missing > 0:
			missing++
			continue
		}
		child := at.kids[c]
		switch {
		case child == nil:
			missing = 1
			continue
		case child.n.typ == typeSymlink:
			r := t.resolveLink(child)
			if r.status != resOK {
				return r
			}
			at, missing = r.at, r.missing
		default:
			at = child
		}
		if at.n.typ != typeDir && missing == 0 && hasMore(comps[i+1:]) {
			return resolution{status: resDead} // ENOTDIR
		}
	}
	return resolution{status: resOK, at: at, missing: missing}
}

func hasMore(comps []string) bool {
	for _, c := range comps {
		if c != "" {
			return true
		}
	}
	return false
}

// readIgnoreFile reads an ignore file the way BuildKit's frontend does:
// through symlinks (the os.Root keeps that inside the context), missing
// means none.
func (x *extractor) readIgnoreFile(name string) ([]string, error) {
	if x.nodes[name] == nil {
		return nil, nil
	}
	data, err := x.root.ReadFile(name)
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ELOOP):
		return nil, nil
	case errors.Is(err, syscall.EISDIR) || (err == nil && x.nodes[name].typ == typeDir):
		return nil, badInput("the context's %s is a directory; it must be a file of patterns", name)
	case err != nil:
		return nil, x.fsFault(err, name)
	}
	patterns, err := parseIgnore(data)
	if err != nil {
		return nil, badInput("the context's %s could not be read (%v); fix it", name, err)
	}
	return patterns, nil
}

// finishDirs applies directory modes and mtimes last: a directory archived
// as 0555 must still accept its children, and creating a child changes the
// parent's mtime. Deepest first, so a parent's mode never blocks a child.
func (x *extractor) finishDirs() error {
	var dirs []string
	for p, n := range x.nodes {
		if n.typ == typeDir && p != "." {
			dirs = append(dirs, p)
		}
	}
	slices.Sort(dirs)
	slices.Reverse(dirs)
	for _, p := range dirs {
		n := x.nodes[p]
		if !n.mtime.IsZero() {
			_ = x.root.Chtimes(p, n.mtime, n.mtime) // best effort, as for files
		}
		mode := os.FileMode(n.mode & 0o777)
		if n.mode&0o1000 != 0 {
			mode |= os.ModeSticky
		}
		if err := x.root.Chmod(p, mode); err != nil {
			return x.fsFault(err, p)
		}
	}
	return nil
}

// fsFault reports a failure of the server's own filesystem. It names the
// entry and the errno but not the server's directory layout.
func (x *extractor) fsFault(err error, entry string) *Error {
	cause := err
	var pe *fs.PathError
	if errors.As(err, &pe) {
		cause = pe.Err
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		cause = le.Err
	}
	return &Error{
		Msg: fmt.Sprintf("storing context entry %q on the kiln server failed (%v); retry later or contact the kiln operator", entry, cause),
		err: err,
	}
}

// makeTargetDir creates dir, or accepts it if it exists and is empty.
func makeTargetDir(dir string) error {
	err := os.Mkdir(dir, 0o700)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrExist) {
		return serverFault(err, "creating the build context directory failed")
	}
	entries, rerr := os.ReadDir(dir)
	if rerr != nil {
		return serverFault(rerr, "the build context directory exists and cannot be read")
	}
	if len(entries) > 0 {
		// Not ours to delete: report and leave it alone.
		return &Error{Msg: fmt.Sprintf("the build context directory %s already exists and is not empty; this is a kiln bug, report it", filepath.Base(dir))}
	}
	return nil
}

// removeTree deletes dir. If a read-only directory blocks a non-root
// server, it makes the tree writable and tries again.
func removeTree(dir string) error {
	if err := os.RemoveAll(dir); err == nil {
		return nil
	}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
	return os.RemoveAll(dir)
}

// limitCounter counts what passes through and fails once more than limit
// bytes have (limit 0: never). The flag, not the error value, is what
// classify trusts: decompressors are free to wrap or replace errors.
type limitCounter struct {
	r     io.Reader
	n     int64
	limit int64
	over  bool
}

var errOverLimit = errors.New("over the size limit")

func (c *limitCounter) Read(p []byte) (int, error) {
	if c.over {
		return 0, errOverLimit
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.limit > 0 && c.n > c.limit {
		c.over = true
		return 0, errOverLimit
	}
	return n, err
}

// sourceReader makes reads of the upload cancelable: each Read of r runs in
// a goroutine (into a private buffer, so an abandoned read never touches
// the caller's memory) and Read returns as soon as ctx is done.
type sourceReader struct {
	ctx      context.Context
	r        io.Reader
	buf      []byte
	res      chan sourceRead // capacity 1: an abandoned read never blocks
	inflight bool
	err      error // sticky
	srcErr   error // a non-EOF error returned by r
}

type sourceRead struct {
	n   int
	err error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !s.inflight {
		if err := s.ctx.Err(); err != nil {
			s.err = err
			return 0, err
		}
		s.inflight = true
		b := s.buf[:min(len(p), len(s.buf))]
		go func() {
			n, err := s.r.Read(b)
			s.res <- sourceRead{n, err}
		}()
	}
	select {
	case <-s.ctx.Done():
		s.err = s.ctx.Err()
		return 0, s.err
	case res := <-s.res:
		s.inflight = false
		n := copy(p, s.buf[:res.n])
		if res.err != nil {
			s.err = res.err
			if !errors.Is(res.err, io.EOF) {
				s.srcErr = res.err
			}
		}
		return n, res.err
	}
}
