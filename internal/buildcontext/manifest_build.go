package buildcontext

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Sources says where each blob of a Manifest can be read locally: digest
// to the first file of the context with that content.
type Sources map[string]Source

// Source is one local file holding a blob.
type Source struct {
	Path string // on disk
	Rel  string // its context path, for messages
	Size int64
}

// DigestPrefix starts every blob digest of a Manifest.
const DigestPrefix = "sha256:"

// maxHashWorkers bounds concurrent file reads: enough to keep a fast disk
// and a few cores busy, few enough not to thrash a spinning disk.
const maxHashWorkers = 8

// BuildManifest describes dir by content: it chooses entries exactly as
// Pack does (same .dockerignore semantics, Dockerfile and .dockerignore
// always in, escaping symlinks refused, sockets and devices skipped with
// opt.Warn, later names of a shared inode as hard links to the first) and
// in the same order, with the modes Pack writes (tarMode). Regular files
// get their size and SHA-256; cache, if not nil, supplies the digests of
// files unchanged since it last saw them and learns the others (the caller
// Saves it). Files are read by a few goroutines at once. opt.Progress
// receives the entries walked and the file bytes covered so far (cached or
// hashed), from any of them but never concurrently; opt.Compression is
// ignored.
//
// The returned Sources holds every file digest of the manifest, for
// WriteBlobs. PackStats.Written is 0: nothing was sent yet.
func BuildManifest(ctx context.Context, dir string, opt PackOptions, cache *HashCache) (Manifest, Sources, PackStats, error) {
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return Manifest{}, nil, PackStats{}, fmt.Errorf("build context %q: %w", dir, err)
	}
	if cache == nil {
		cache = NewMemoryHashCache()
	}
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	b := &manifestBuilder{
		ctx:    hctx,
		opt:    opt,
		cache:  cache,
		start:  cache.now(),
		links:  map[inodeKey]string{},
		work:   make(chan *hashJob, 64),
		cancel: cancel,
		tick:   ticker{fn: opt.Progress},
	}
	if n := cache.sizeHint(); n > 0 {
		b.entries, b.abs = make([]ManifestEntry, 0, n+n/8+16), make([]string, 0, n+n/8+16)
	}
	// Walking the absolute path makes every walkItem.abs the cache key
	// as it is, without a filepath.Join per file.
	walkErr := walkContext(hctx, absDir, opt.Dockerfile, b.add)
	close(b.work)
	b.workers.Wait()
	if err := b.finish(walkErr); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return Manifest{}, nil, b.stats, err
	}
	b.progress(0, true)
	return Manifest{Version: ManifestVersion, Entries: b.entries}, b.sources(), b.stats, nil
}

type manifestBuilder struct {
	ctx     context.Context
	opt     PackOptions
	cache   *HashCache
	start   time.Time
	entries []ManifestEntry
	abs     []string            // of each file entry, by entry index; "" for others
	links   map[inodeKey]string // first path of each multiply-linked inode
	jobs    []*hashJob
	work    chan *hashJob
	workers sync.WaitGroup
	started bool // workers run only once there is something to hash
	cancel  context.CancelFunc
	stats   PackStats

	walked  atomic.Int64 // entries, for progress
	covered atomic.Int64 // file bytes cached or hashed, for progress
	tickMu  sync.Mutex
	tick    ticker
}

// hashJob is one file to read; a worker fills digest or err.
type hashJob struct {
	entry    int // index into entries
	abs, rel string
	key      statKey
	digest   [32]byte
	err      error
}

func (b *manifestBuilder) add(it walkItem) error {
	m := it.info.Mode()
	e := ManifestEntry{Path: it.rel, Mode: uint32(tarMode(m))}
	kind, target, err := classify(it, b.links, &b.stats, b.opt.Warn)
	switch {
	case err != nil:
		return err
	case kind == kindSkipped:
		return nil
	case kind == kindFile:
		return b.addFile(it, e)
	case kind == kindDir:
		e.Type = EntryDir
	case kind == kindSymlink:
		e.Type, e.Target = EntrySymlink, target
	case kind == kindHardlink:
		e.Type, e.Target = EntryHardlink, target
	}
	b.entries = append(b.entries, e)
	b.abs = append(b.abs, "")
	b.stats.Files++
	b.walked.Add(1)
	b.progress(0, false)
	return nil
}

func (b *manifestBuilder) addFile(it walkItem, e ManifestEntry) error {
	e.Type, e.Size = EntryFile, it.info.Size()
	abs := it.abs
	key := statKeyOf(it.info)
	idx := len(b.entries)
	b.entries = append(b.entries, e)
	b.abs = append(b.abs, abs)
	b.stats.Files++
	b.stats.Bytes += e.Size
	b.walked.Add(1)
	if sum, ok := b.cache.lookup(abs, key); ok {
		b.entries[idx].Digest = digestString(sum)
		b.progress(e.Size, false)
		return nil
	}
	j := &hashJob{entry: idx, abs: abs, rel: it.rel, key: key}
	b.jobs = append(b.jobs, j)
	if !b.started {
		// Started lazily: idle workers cost a warm walk, where nothing is
		// hashed, a measurable share of its few milliseconds.
		b.started = true
		for range min(runtime.GOMAXPROCS(0), maxHashWorkers) {
			b.workers.Go(b.hashWorker)
		}
	}
	select {
	case b.work <- j:
		return nil
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
}

func (b *manifestBuilder) hashWorker() {
	buf := make([]byte, 256<<10)
	for j := range b.work {
		if err := b.ctx.Err(); err != nil {
			j.err = err
			continue
		}
		j.digest, j.err = hashFile(b.ctx, j.abs, j.rel, j.key.size, buf, func(n int) { b.progress(int64(n), false) })
		if j.err != nil {
			b.cancel() // the first failure ends the walk and the other workers
		}
	}
}

// finish fills in the digests the workers computed and teaches the cache
// the new ones, or returns the error that stopped the walk or a worker.
func (b *manifestBuilder) finish(walkErr error) error {
	var canceled error
	for _, j := range b.jobs {
		if j.err == nil {
			continue
		}
		if errors.Is(j.err, context.Canceled) {
			canceled = j.err
			continue
		}
		return j.err // a real failure explains a cancellation it caused
	}
	if walkErr != nil {
		return walkErr
	}
	if canceled != nil {
		return canceled
	}
	for _, j := range b.jobs {
		b.entries[j.entry].Digest = digestString(j.digest)
		b.cache.store(j.abs, j.key, j.digest, b.start)
	}
	return nil
}

func (b *manifestBuilder) sources() Sources {
	src := make(Sources, len(b.entries))
	for i, e := range b.entries {
		if e.Type != EntryFile {
			continue
		}
		if _, ok := src[e.Digest]; !ok {
			src[e.Digest] = Source{Path: b.abs[i], Rel: e.Path, Size: e.Size}
		}
	}
	return src
}

// progress adds n covered bytes and reports, rate-limited; workers and
// the walk call it concurrently.
func (b *manifestBuilder) progress(n int64, force bool) {
	covered := b.covered.Add(n)
	if b.tick.fn == nil {
		return
	}
	b.tickMu.Lock()
	defer b.tickMu.Unlock()
	b.tick.files, b.tick.bytes = int(b.walked.Load()), covered
	b.tick.update(force)
}

// hashFile returns the SHA-256 of the first size bytes of the file, which
// must have at least that many; onRead is told of every chunk.
func hashFile(ctx context.Context, abs, rel string, size int64, buf []byte, onRead func(n int)) ([32]byte, error) {
	f, err := os.Open(abs)
	if err != nil {
		return [32]byte{}, fmt.Errorf("open %q: %w", rel, err)
	}
	defer f.Close()
	h := sha256.New()
	remaining := size
	for remaining > 0 {
		if err := ctx.Err(); err != nil {
			return [32]byte{}, err
		}
		n, err := f.Read(buf[:min(int64(len(buf)), remaining)])
		if n > 0 {
			h.Write(buf[:n])
			remaining -= int64(n)
			onRead(n)
		}
		if errors.Is(err, io.EOF) && remaining > 0 {
			return [32]byte{}, fmt.Errorf("read %q: the file shrank while it was being hashed; retry when nothing is writing to it", rel)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return [32]byte{}, fmt.Errorf("read %q: %w", rel, err)
		}
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum, nil
}

func digestString(sum [32]byte) string {
	buf := make([]byte, len(DigestPrefix)+hex.EncodedLen(len(sum)))
	copy(buf, DigestPrefix)
	hex.Encode(buf[len(DigestPrefix):], sum[:])
	return string(buf)
}

// WriteBlobs writes the blobs named by digests, read from src, as a plain
// tar whose entries are named by their digest: the body of
// POST /v1/contexts/blobs. Each file is hashed again while it is sent;
// a file that no longer has the size or content it was hashed with fails
// the whole write (the caller aborts the request), since the server would
// refuse the mismatching blob anyway. progress, if set, receives the
// running total of blob bytes written.
func WriteBlobs(ctx context.Context, w io.Writer, digests []string, src Sources, progress func(bytes int64)) error {
	tw := tar.NewWriter(w)
	buf := make([]byte, 256<<10)
	var total int64
	onWrite := func(n int) {
		total += int64(n)
		if progress != nil {
			progress(total)
		}
	}
	for _, d := range digests {
		s, ok := src[d]
		if !ok {
			return fmt.Errorf("write blob %s: no file of this context has that content", d)
		}
		if err := writeBlob(ctx, tw, d, s, buf, onWrite); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("finish blob tar: %w", err)
	}
	return nil
}

func writeBlob(ctx context.Context, tw *tar.Writer, digest string, s Source, buf []byte, onWrite func(n int)) error {
	f, err := os.Open(s.Path)
	if err != nil {
		return fmt.Errorf("open %q: %w", s.Rel, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %q: %w", s.Rel, err)
	}
	if st.Size() != s.Size {
		return changedError(s.Rel)
	}
	hdr := &tar.Header{Name: digest, Typeflag: tar.TypeReg, Mode: 0o644, Size: s.Size, ModTime: time.Unix(0, 0)}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write blob of %q: %w", s.Rel, err)
	}
	h := sha256.New()
	remaining := s.Size
	for remaining > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := f.Read(buf[:min(int64(len(buf)), remaining)])
		if n > 0 {
			h.Write(buf[:n])
			if _, werr := tw.Write(buf[:n]); werr != nil {
				return fmt.Errorf("write blob of %q: %w", s.Rel, werr)
			}
			remaining -= int64(n)
			onWrite(n)
		}
		if errors.Is(err, io.EOF) && remaining > 0 {
			return changedError(s.Rel)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read %q: %w", s.Rel, err)
		}
	}
	if got := DigestPrefix + hex.EncodeToString(h.Sum(nil)); got != digest {
		return changedError(s.Rel)
	}
	return nil
}

// ErrChangedSinceHashed is wrapped by WriteBlobs' error for a file that
// changed between hashing and sending.
var ErrChangedSinceHashed = errors.New("file changed since it was hashed")

func changedError(rel string) error {
	return fmt.Errorf("send %q: %w; retry the build when nothing is writing to it", rel, ErrChangedSinceHashed)
}
