package buildcontext

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/moby/patternmatcher"
)

// Compression selects how Pack compresses the tar.
type Compression int

const (
	Gzip         Compression = iota // the default: every kiln server and tool reads it
	Zstd                            // faster and smaller; kiln servers accept it
	Uncompressed                    // a plain tar
)

// PackOptions configures Pack and Scan.
type PackOptions struct {
	// Dockerfile is the Dockerfile's path, relative to the context directory
	// (or absolute); "Dockerfile" when empty. Like docker build, Pack sends
	// it even when .dockerignore excludes it. A Dockerfile outside the
	// context is simply not part of it.
	Dockerfile  string
	Compression Compression
	// Progress, if set, receives the running totals (entries written and
	// regular-file bytes read) at most about every 100 ms, and once more
	// with the final totals when Pack finishes successfully. The totals
	// are comparable to what Scan returns. It is called on Pack's goroutine
	// and must return quickly.
	Progress func(files int, bytes int64)
	// Warn, if set, receives a message for each entry Pack leaves out on
	// its own accord (sockets, devices, named pipes).
	Warn func(msg string)
}

// PackStats summarises what Pack sent.
type PackStats struct {
	Files   int   // entries written: files, directories, symlinks, hard links
	Bytes   int64 // regular-file content bytes (hard links counted once)
	Written int64 // bytes written to w, after compression
	Skipped int   // sockets, devices and named pipes left out
}

const progressInterval = 100 * time.Millisecond

// Pack writes dir as a compressed tar to w, choosing files as docker build
// does: dir/.dockerignore applies with BuildKit's semantics, and the
// Dockerfile and .dockerignore are always included. Entries are written in
// a deterministic order (a directory before its contents, names sorted),
// with relative paths, uid/gid 0 and no owner names, mtimes truncated to
// seconds; symlinks stay symlinks and files sharing an inode become hard
// links. Symlinks that point outside dir are refused here, since a kiln
// server would refuse the whole context after the upload.
//
// On error the stream written so far is not a valid archive; the caller
// should abort the upload. Errors name the file that caused them.
func Pack(ctx context.Context, dir string, w io.Writer, opt PackOptions) (PackStats, error) {
	cw := &countWriter{w: w}
	var zw io.WriteCloser
	switch opt.Compression {
	case Gzip:
		gw, err := gzip.NewWriterLevel(cw, gzip.DefaultCompression)
		if err != nil {
			return PackStats{}, fmt.Errorf("start gzip: %w", err)
		}
		zw = gw
	case Zstd:
		enc, err := zstd.NewWriter(cw)
		if err != nil {
			return PackStats{}, fmt.Errorf("start zstd: %w", err)
		}
		zw = enc
	case Uncompressed:
		zw = nopWriteCloser{cw}
	default:
		return PackStats{}, fmt.Errorf("unknown compression %d", opt.Compression)
	}

	p := &packer{
		ctx:   ctx,
		tw:    tar.NewWriter(zw),
		opt:   opt,
		links: map[inodeKey]string{},
		buf:   make([]byte, 256<<10),
		tick:  ticker{fn: opt.Progress},
	}
	err := walkContext(ctx, dir, opt.Dockerfile, p.add)
	if err == nil {
		err = p.tw.Close()
		if err != nil {
			err = fmt.Errorf("finish tar: %w", err)
		}
	}
	// Always release the compressor (zstd runs goroutines), but on failure
	// do not let it look like a complete stream was intended.
	if closeErr := zw.Close(); err == nil && closeErr != nil {
		err = fmt.Errorf("finish compression: %w", closeErr)
	}
	p.stats.Written = cw.n
	if err != nil {
		return p.stats, err
	}
	p.tick.files, p.tick.bytes = p.stats.Files, p.stats.Bytes
	p.tick.update(true)
	return p.stats, nil
}

// Scan returns the totals Pack would report (entries and regular-file
// bytes) without reading any file content, for sizing a progress bar.
func Scan(ctx context.Context, dir string, opt PackOptions) (files int, bytes int64, err error) {
	links := map[inodeKey]bool{}
	err = walkContext(ctx, dir, opt.Dockerfile, func(it walkItem) error {
		m := it.info.Mode()
		switch {
		case m.IsRegular():
			if key, ok := inodeOf(it.info); ok {
				if links[key] {
					files++
					return nil
				}
				links[key] = true
			}
			files++
			bytes += it.info.Size()
		case m.IsDir(), m&fs.ModeSymlink != 0:
			files++
		}
		return nil
	})
	return files, bytes, err
}

type packer struct {
	ctx   context.Context
	tw    *tar.Writer
	opt   PackOptions
	links map[inodeKey]string // first path written for each multiply-linked inode
	stats PackStats
	buf   []byte
	tick  ticker
}

// entryKind is how Pack and BuildManifest send one walked entry.
type entryKind int

const (
	kindDir entryKind = iota
	kindSymlink
	kindFile
	kindHardlink
	kindSkipped
)

// classify decides how a walked entry is sent: a symlink with its target
// (checked to stay inside the context), a regular file, or a hard link to
// the first path of an inode already sent (links records those), while
// sockets, devices and pipes are counted in stats and reported to warn.
func classify(it walkItem, links map[inodeKey]string, stats *PackStats, warn func(string)) (entryKind, string, error) {
	m := it.info.Mode()
	switch {
	case m.IsDir():
		return kindDir, "", nil
	case m&fs.ModeSymlink != 0:
		target, err := os.Readlink(it.abs)
		if err != nil {
			return 0, "", fmt.Errorf("read symlink %q: %w", it.rel, err)
		}
		if err := checkSymlinkTarget(it.rel, target, it.rel); err != nil {
			return 0, "", err
		}
		return kindSymlink, target, nil
	case m.IsRegular():
		if key, ok := inodeOf(it.info); ok {
			if first, seen := links[key]; seen {
				return kindHardlink, first, nil
			}
			links[key] = it.rel
		}
		return kindFile, "", nil
	}
	stats.Skipped++
	if warn != nil {
		warn(fmt.Sprintf("skipping %q: it is a %s, which cannot be part of a build context", it.rel, specialKind(m)))
	}
	return kindSkipped, "", nil
}

func (p *packer) add(it walkItem) error {
	m := it.info.Mode()
	hdr := &tar.Header{
		Name:    it.rel,
		Mode:    tarMode(m),
		ModTime: it.info.ModTime().Truncate(time.Second),
	}
	kind, target, err := classify(it, p.links, &p.stats, p.opt.Warn)
	switch {
	case err != nil:
		return err
	case kind == kindSkipped:
		return nil
	case kind == kindFile:
		return p.addFile(it, hdr)
	case kind == kindDir:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case kind == kindSymlink:
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	case kind == kindHardlink:
		hdr.Typeflag, hdr.Linkname = tar.TypeLink, target
	}
	if err := p.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write %q: %w", it.rel, err)
	}
	p.entryDone()
	return nil
}

func (p *packer) addFile(it walkItem, hdr *tar.Header) error {
	// Open before writing the header so an unreadable file fails cleanly
	// with its name, not halfway through an entry.
	f, err := os.Open(it.abs)
	if err != nil {
		return fmt.Errorf("open %q: %w", it.rel, err)
	}
	defer f.Close()
	hdr.Typeflag = tar.TypeReg
	hdr.Size = it.info.Size()
	if err := p.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write %q: %w", it.rel, err)
	}
	remaining := hdr.Size
	for remaining > 0 {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		n, err := f.Read(p.buf[:min(int64(len(p.buf)), remaining)])
		if n > 0 {
			if _, werr := p.tw.Write(p.buf[:n]); werr != nil {
				return fmt.Errorf("write %q: %w", it.rel, werr)
			}
			remaining -= int64(n)
			p.stats.Bytes += int64(n)
			p.tick.files, p.tick.bytes = p.stats.Files, p.stats.Bytes
			p.tick.update(false)
		}
		if errors.Is(err, io.EOF) && remaining > 0 {
			return fmt.Errorf("read %q: the file shrank while it was being packed; retry when nothing is writing to it", it.rel)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read %q: %w", it.rel, err)
		}
	}
	p.entryDone()
	return nil
}

func (p *packer) entryDone() {
	p.stats.Files++
	p.tick.files, p.tick.bytes = p.stats.Files, p.stats.Bytes
	p.tick.update(false)
}

// tarMode keeps the Unix permission, setuid/setgid and sticky bits. The
// server decides what it honours; the archive says what the disk says.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}

func specialKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeDevice != 0:
		return "device node"
	}
	return "special file"
}

type walkItem struct {
	rel  string // slash-separated, relative to the context root
	abs  string
	info fs.FileInfo // from lstat: symlinks are not followed
}

// walkContext calls fn for every entry of dir that survives its
// .dockerignore, parents before children, names in lexical order: the
// order fsutil walks in, so an excluded directory that still has a kept
// descendant is reported just before that descendant.
func walkContext(ctx context.Context, dir, dockerfile string, fn func(walkItem) error) error {
	info, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("build context %q: %w", dir, err)
	}
	if !info.IsDir() {
		return fmt.Errorf("build context %q is not a directory", dir)
	}
	ig, err := packIgnorer(dir, dockerfile)
	if err != nil {
		return err
	}

	var pending []walkItem
	var visit func(absDir, relDir string, parent patternmatcher.MatchInfo, excludedDir bool) error
	visit = func(absDir, relDir string, parent patternmatcher.MatchInfo, excludedDir bool) error {
		entries, err := readDirStat(absDir)
		if err != nil {
			if excludedDir && errors.Is(err, fs.ErrPermission) {
				return nil // as fsutil: an unreadable excluded directory is no error
			}
			name := relDir
			if name == "" {
				name = "."
			}
			return fmt.Errorf("read directory %q: %w", name, err)
		}
		for _, info := range entries {
			if err := ctx.Err(); err != nil {
				return err
			}
			it := walkItem{rel: info.Name(), abs: filepath.Join(absDir, info.Name()), info: info}
			if relDir != "" {
				it.rel = relDir + "/" + info.Name()
			}
			excluded, descend, mi, err := ig.check(it.rel, it.info.IsDir(), parent)
			if err != nil {
				return err
			}
			if !excluded {
				for _, d := range pending {
					if err := fn(d); err != nil {
						return err
					}
				}
				pending = pending[:0]
				if err := fn(it); err != nil {
					return err
				}
			}
			if !descend {
				continue
			}
			if excluded {
				pending = append(pending, it)
			}
			if err := visit(it.abs, it.rel, mi, excluded); err != nil {
				return err
			}
			if excluded && len(pending) > 0 && pending[len(pending)-1].rel == it.rel {
				pending = pending[:len(pending)-1]
			}
		}
		return nil
	}
	return visit(dir, "", patternmatcher.MatchInfo{}, false)
}

// packIgnorer reads the ignore file BuildKit will honour, the Dockerfile's
// own "<Dockerfile>.dockerignore" when it has one, else dir/.dockerignore,
// and adds docker build's exceptions for the files the build itself needs
// (the CLI's TrimBuildFilesFromExcludes): the Dockerfile and the ignore
// file are sent even if excluded. The server does not add these when it
// hashes, exactly like BuildKit does not see them.
func packIgnorer(dir, dockerfile string) (*ignorer, error) {
	df := dockerfileInContext(dir, dockerfile)
	name := ignoreFileName
	if df != "" {
		if st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(df+".dockerignore"))); err == nil && st.Mode().IsRegular() {
			name = df + ".dockerignore"
		}
	}
	data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name)))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	patterns, err := parseIgnore(data)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	if len(patterns) > 0 {
		for _, keep := range []string{name, df} {
			if keep == "" {
				continue
			}
			excluded, err := patternmatcher.MatchesOrParentMatches(keep, patterns)
			if err != nil {
				return nil, fmt.Errorf("invalid pattern in %s: %w", name, err)
			}
			if excluded {
				patterns = append(patterns, "!"+keep)
			}
		}
	}
	return newIgnorer(patterns)
}

// dockerfileInContext returns the Dockerfile's slash path relative to dir,
// or "" when it lies outside.
func dockerfileInContext(dir, dockerfile string) string {
	if dockerfile == "" {
		return "Dockerfile"
	}
	if filepath.IsAbs(dockerfile) {
		absDir, err := filepath.Abs(dir)
		if err != nil {
			return ""
		}
		rel, err := filepath.Rel(absDir, dockerfile)
		if err != nil {
			return ""
		}
		dockerfile = rel
	}
	if !filepath.IsLocal(dockerfile) {
		return ""
	}
	return filepath.ToSlash(filepath.Clean(dockerfile))
}

// ticker rate-limits progress callbacks.
type ticker struct {
	fn    func(files int, bytes int64)
	last  time.Time
	files int
	bytes int64
}

func (t *ticker) update(force bool) {
	if t.fn == nil {
		return
	}
	now := time.Now()
	if !force && now.Sub(t.last) < progressInterval {
		return
	}
	t.last = now
	t.fn(t.files, t.bytes)
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }
