// Package ctxstore keeps the content of recent build contexts, by digest
// and per tenant, so a client sends only the files the server lacks (see
// buildcontext.Manifest) and a context is materialized by hard links.
//
// Each tenant has a store of its own: asking whether a blob exists must
// not tell one tenant what another has uploaded. Stores are bounded per
// tenant and in total; the least recently used blobs go first, never one
// a materialization is linking. A context already materialized holds its
// own links, so evicting a blob never touches a build's context.
//
// On disk, under the store's directory:
//
//	<sha256(tenant)[:16]>/<hex digest>           the blob, mode 0644, mtime buildcontext.ContentTime
//	<sha256(tenant)[:16]>/<hex digest>.m<mode>   the same content with another mode (hard links share modes)
//	<sha256(tenant)[:16]>/.tmp-*                 uploads in progress (removed at Open)
package ctxstore

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/errdefs"
)

// Config bounds a Store.
type Config struct {
	// MaxBytesPerTenant bounds one tenant's blobs (0: no bound).
	MaxBytesPerTenant int64
	// MaxTotalBytes bounds all tenants' blobs together (0: no bound).
	MaxTotalBytes int64
	// MaxBlobBytes bounds one blob (0: no bound); the server's context
	// size limit.
	MaxBlobBytes int64
	Logger       *slog.Logger
}

// Store is the content store of all tenants.
type Store struct {
	dir string
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	tenants map[string]*tenant // by directory name
	total   int64
}

type tenant struct {
	dir   string
	blobs map[string]*blob // by hex digest
	bytes int64
}

type blob struct {
	size     int64
	files    int // the blob and its mode variants, each size bytes
	modes    map[uint32]bool
	lastUsed time.Time
	pins     int
}

// baseMode is the mode of a blob's first file.
const baseMode = 0o644

// Open opens (creating) the store in dir and indexes what it holds.
func Open(dir string, cfg Config) (*Store, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create context store: %w", err)
	}
	s := &Store{dir: dir, cfg: cfg, log: cfg.Logger, tenants: map[string]*tenant{}}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read context store: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		t, err := s.index(e.Name())
		if err != nil {
			return nil, err
		}
		s.tenants[e.Name()] = t
		s.total += t.bytes
	}
	return s, nil
}

// index reads one tenant's directory; leftovers of interrupted uploads go.
func (s *Store) index(name string) (*tenant, error) {
	t := &tenant{dir: filepath.Join(s.dir, name), blobs: map[string]*blob{}}
	entries, err := os.ReadDir(t.dir)
	if err != nil {
		return nil, fmt.Errorf("read context store: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			os.Remove(filepath.Join(t.dir, e.Name()))
			continue
		}
		hexd, mode, ok := parseName(e.Name())
		if !ok {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		b := t.blobs[hexd]
		if b == nil {
			b = &blob{size: fi.Size(), modes: map[uint32]bool{}}
			t.blobs[hexd] = b
		}
		b.modes[mode] = true
		b.files++
		t.bytes += fi.Size()
		// Linking a file into a context changes its ctime: the best record
		// of last use that survives a restart.
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if c := time.Unix(st.Ctim.Sec, st.Ctim.Nsec); c.After(b.lastUsed) {
				b.lastUsed = c
			}
		}
	}
	return t, nil
}

// parseName reads "<hex>" or "<hex>.m<octal mode>".
func parseName(name string) (hexd string, mode uint32, ok bool) {
	hexd, m, hasMode := strings.Cut(name, ".m")
	if len(hexd) != 64 {
		return "", 0, false
	}
	if _, err := hex.DecodeString(hexd); err != nil {
		return "", 0, false
	}
	if !hasMode {
		return hexd, baseMode, true
	}
	v, err := strconv.ParseUint(m, 8, 32)
	if err != nil || v > 0o777 {
		return "", 0, false
	}
	return hexd, uint32(v), true
}

func tenantDir(name string) string {
	sum := sha256.Sum256([]byte(name))
	return hex.EncodeToString(sum[:16])
}

// tenantLocked returns the tenant's store, making it on first use.
func (s *Store) tenantLocked(name string) *tenant {
	id := tenantDir(name)
	t := s.tenants[id]
	if t == nil {
		t = &tenant{dir: filepath.Join(s.dir, id), blobs: map[string]*blob{}}
		s.tenants[id] = t
	}
	return t
}

// Missing returns the digests of digests the tenant's store lacks, and
// counts the others as used.
func (s *Store) Missing(tenantName string, digests []string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tenantLocked(tenantName)
	missing := []string{}
	now := time.Now()
	for _, d := range digests {
		hexd, ok := hexOf(d)
		if !ok {
			return nil, errdefs.Invalid("%s is not a content digest; want sha256:<64 lowercase hex digits>", errdefs.Quote(d))
		}
		if b := t.blobs[hexd]; b != nil {
			b.lastUsed = now
			continue
		}
		missing = append(missing, d)
	}
	return missing, nil
}

func hexOf(d string) (string, bool) {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(h) != 64 || strings.ToLower(h) != h {
		return "", false
	}
	if _, err := hex.DecodeString(h); err != nil {
		return "", false
	}
	return h, true
}

// PutStats is what Put stored.
type PutStats struct {
	Stored int   `json:"stored"`
	Bytes  int64 `json:"bytes"`
}

// Put reads a tar of blobs, each regular file named by its digest
// ("sha256:<hex>"), verifies every one and adds it to the tenant's store.
// A blob whose content does not match its name fails the request; blobs
// before it stay stored.
func (s *Store) Put(ctx context.Context, tenantName string, r io.Reader) (PutStats, error) {
	var st PutStats
	s.mu.Lock()
	t := s.tenantLocked(tenantName)
	s.mu.Unlock()
	if err := os.MkdirAll(t.dir, 0o700); err != nil {
		return st, fmt.Errorf("create context store: %w", err)
	}
	tr := tar.NewReader(r)
	buf := make([]byte, 128<<10)
	for {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return st, errdefs.Invalid("the blob upload is not a readable tar (%v); send a tar of files named sha256:<hex>", err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		hexd, ok := hexOf(hdr.Name)
		if !ok {
			return st, errdefs.Invalid("blob upload entry %s is not named by a content digest; want sha256:<64 lowercase hex digits>", errdefs.Quote(hdr.Name))
		}
		if s.cfg.MaxBlobBytes > 0 && hdr.Size > s.cfg.MaxBlobBytes {
			return st, errdefs.Invalid("blob %s is %d bytes, over the server's context limit of %d", hdr.Name, hdr.Size, s.cfg.MaxBlobBytes)
		}
		n, err := s.putOne(t, hexd, hdr.Name, io.LimitReader(tr, hdr.Size), buf)
		if err != nil {
			return st, err
		}
		if n >= 0 {
			st.Stored++
			st.Bytes += n
		}
	}
	s.evict()
	return st, nil
}

// putOne stores one blob; -1 means it was there already.
func (s *Store) putOne(t *tenant, hexd, name string, r io.Reader, buf []byte) (int64, error) {
	s.mu.Lock()
	have := t.blobs[hexd] != nil
	s.mu.Unlock()
	if have {
		_, err := io.CopyBuffer(io.Discard, r, buf)
		return -1, err
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(t.dir, ".tmp-"+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, baseMode)
	if err != nil {
		return 0, fmt.Errorf("store blob: %w", err)
	}
	h := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(f, h), r, buf)
	if err == nil {
		err = f.Chmod(baseMode) // whatever the umask
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("store blob %s: %w", name, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != hexd {
		os.Remove(tmp)
		return 0, errdefs.Invalid("blob %s has content with digest sha256:%s; the file changed while it was sent, or the upload is corrupt: send it again", name, got)
	}
	var sum [32]byte
	hex.Decode(sum[:], []byte(hexd))
	mt := buildcontext.ContentTime(sum)
	if err := os.Chtimes(tmp, mt, mt); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("store blob %s: %w", name, err)
	}
	if err := os.Rename(tmp, filepath.Join(t.dir, hexd)); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("store blob %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.blobs[hexd] != nil { // a concurrent upload of the same blob won
		return -1, nil
	}
	t.blobs[hexd] = &blob{size: n, files: 1, modes: map[uint32]bool{baseMode: true}, lastUsed: time.Now()}
	t.bytes += n
	s.total += n
	return n, nil
}

// Source is a tenant's view for one materialization: the blobs it hands
// out stay pinned (never evicted) until Release.
type Source struct {
	s      *Store
	t      *tenant
	pinned []*blob
}

// Source opens the tenant's blobs for buildcontext.Materialize.
func (s *Store) Source(tenantName string) *Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	return &Source{s: s, t: s.tenantLocked(tenantName)}
}

// BlobFile implements buildcontext.BlobSource: the blob's file with mode
// (made once per mode by copying the blob).
func (src *Source) BlobFile(digest string, mode uint32) (string, int64, error) {
	hexd, ok := hexOf(digest)
	if !ok {
		return "", 0, fmt.Errorf("%w: %s is not a content digest", buildcontext.ErrMissingBlobs, digest)
	}
	s, t := src.s, src.t
	s.mu.Lock()
	b := t.blobs[hexd]
	if b == nil {
		s.mu.Unlock()
		return "", 0, fmt.Errorf("%w: %s", buildcontext.ErrMissingBlobs, digest)
	}
	b.pins++
	b.lastUsed = time.Now()
	src.pinned = append(src.pinned, b)
	have := b.modes[mode]
	s.mu.Unlock()
	p := variantPath(t.dir, hexd, mode)
	if have {
		return p, b.size, nil
	}
	if err := makeVariant(filepath.Join(t.dir, hexd), p, mode); err != nil {
		return "", 0, fmt.Errorf("give blob %s mode %o: %w", digest, mode, err)
	}
	s.mu.Lock()
	if !b.modes[mode] {
		b.modes[mode] = true
		b.files++
		t.bytes += b.size
		s.total += b.size
	}
	s.mu.Unlock()
	return p, b.size, nil
}

// Release unpins what the materialization used.
func (src *Source) Release() {
	src.s.mu.Lock()
	for _, b := range src.pinned {
		b.pins--
	}
	src.pinned = nil
	src.s.mu.Unlock()
	src.s.evict()
}

func variantPath(dir, hexd string, mode uint32) string {
	if mode == baseMode {
		return filepath.Join(dir, hexd)
	}
	return filepath.Join(dir, fmt.Sprintf("%s.m%o", hexd, mode))
}

// makeVariant copies the blob at base to p with mode and base's mtime.
func makeVariant(base, p string, mode uint32) error {
	dir, err := os.OpenRoot(filepath.Dir(p))
	if err != nil {
		return err
	}
	defer dir.Close()
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := ".tmp-" + hex.EncodeToString(rnd[:])
	if err := buildcontext.CopyFile(dir, tmp, base, mode); err != nil {
		dir.Remove(tmp)
		return err
	}
	if err := os.Rename(filepath.Join(filepath.Dir(p), tmp), p); err != nil {
		dir.Remove(tmp)
		return err
	}
	return nil
}

// evict removes least recently used, unpinned blobs (all their files)
// until each tenant and the total are within bounds.
func (s *Store) evict() {
	if s.cfg.MaxBytesPerTenant == 0 && s.cfg.MaxTotalBytes == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range s.tenants {
		for s.cfg.MaxBytesPerTenant > 0 && t.bytes > s.cfg.MaxBytesPerTenant {
			if !s.evictOneLocked(t) {
				break
			}
		}
	}
	for s.cfg.MaxTotalBytes > 0 && s.total > s.cfg.MaxTotalBytes {
		var oldest *tenant
		var oldestAt time.Time
		for _, t := range s.tenants {
			if _, b := lru(t); b != nil && (oldest == nil || b.lastUsed.Before(oldestAt)) {
				oldest, oldestAt = t, b.lastUsed
			}
		}
		if oldest == nil || !s.evictOneLocked(oldest) {
			break
		}
	}
}

func lru(t *tenant) (string, *blob) {
	var name string
	var best *blob
	for h, b := range t.blobs {
		if b.pins == 0 && (best == nil || b.lastUsed.Before(best.lastUsed)) {
			name, best = h, b
		}
	}
	return name, best
}

func (s *Store) evictOneLocked(t *tenant) bool {
	hexd, b := lru(t)
	if b == nil {
		return false
	}
	for mode := range b.modes {
		if err := os.Remove(variantPath(t.dir, hexd, mode)); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("context store: could not remove a blob", "err", err)
		}
	}
	delete(t.blobs, hexd)
	freed := b.size * int64(b.files)
	t.bytes -= freed
	s.total -= freed
	return true
}

// Usage is one tenant's bytes and blob count, for tests and metrics.
func (s *Store) Usage(tenantName string) (bytes int64, blobs int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tenants[tenantDir(tenantName)]
	if t == nil {
		return 0, 0
	}
	return t.bytes, len(t.blobs)
}

// TotalBytes is what all tenants' blobs take.
func (s *Store) TotalBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}
