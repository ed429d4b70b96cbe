package buildcontext

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// HashCache remembers the content digests of a context directory's files
// between builds, the way git's index does: a file whose absolute path,
// device, inode, size, mtime and ctime (all to the nanosecond) are what
// they were when it was hashed is not read again. ctime is part of the key
// because no user-level tool can set it: restoring an old mtime after an
// edit (touch -d, tar -x, rsync -t) still changes ctime.
//
// The cache is a single file per context directory under
// $XDG_CACHE_HOME/kiln/context-hashes/ (~/.cache/kiln/... by default),
// named by a hash of the directory's absolute path. It holds only the
// files seen by the last walk, so it never grows beyond one context's size.
// A missing, corrupt or unreadable file is an empty cache: the price of
// losing it is one cold hash, never a wrong digest.
//
// A HashCache is safe for concurrent use by one process. Two processes
// building the same directory may both Save; each write is atomic and the
// last one wins.
type HashCache struct {
	path string // the cache file; "" for a cache that is never saved
	dir  string // absolute context directory, recorded to detect name clashes

	mu      sync.Mutex
	entries map[string]*hashEntry
	seen    int  // entries marked seen: what Save writes
	dirty   bool // an entry was added or replaced

	// now is the clock for the racy-entry rule; tests move it.
	now func() time.Time
}

// statKey is what must not have changed for a cached digest to be used.
type statKey struct {
	dev, ino uint64
	size     int64
	mtime    int64 // ns since the epoch
	ctime    int64 // ns since the epoch; 0 where the platform has none
}

type hashEntry struct {
	key    statKey
	digest [32]byte
	seen   bool // looked up or stored since the last Save
}

// racyWindow keeps the cache from trusting a file that may still change
// unseen: git's "racily clean" problem. Timestamps have a granularity
// (nanoseconds on ext4, XFS, btrfs and APFS, 1 s on ext3 and HFS+, 2 s on
// FAT; NFS servers may round, and their clocks differ from ours). Suppose
// a file is hashed at time T and rewritten just after, keeping its size:
// its stat key only stays equal if the new timestamps fall in the same
// tick as the old ones, which requires the old ones to be within a tick of
// T. So a digest is cached only if the file's mtime and ctime are at least
// racyWindow older than the moment the walk started (which is before T);
// a file changed more recently is simply hashed again next time, by which
// point its timestamps have aged. Timestamps in the future are never
// trusted either.
const racyWindow = 2 * time.Second

const (
	hashCacheMagic   = "kiln-hashcache\n"
	hashCacheVersion = 1
	// maxHashCacheFile bounds what OpenHashCache reads; a larger file is
	// treated as corrupt (a context of millions of files just rehashes).
	maxHashCacheFile = 512 << 20
)

// HashCacheDir is where hash caches live: $XDG_CACHE_HOME/kiln/context-hashes,
// or ~/.cache/kiln/context-hashes.
func HashCacheDir() (string, error) {
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" || !filepath.IsAbs(base) {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find the cache directory: %w (set XDG_CACHE_HOME)", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "kiln", "context-hashes"), nil
}

// OpenHashCache loads the cache of contextDir. Only a failure to locate the
// cache directory is an error; an unreadable or corrupt cache file yields an
// empty cache that Save replaces.
func OpenHashCache(contextDir string) (*HashCache, error) {
	abs, err := filepath.Abs(contextDir)
	if err != nil {
		return nil, fmt.Errorf("open hash cache for %q: %w", contextDir, err)
	}
	base, err := HashCacheDir()
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(abs))
	c := newHashCache(abs, filepath.Join(base, hex.EncodeToString(sum[:16])))
	if data, err := readBounded(c.path, maxHashCacheFile); err == nil {
		if entries, err := decodeHashCache(data, abs); err == nil {
			c.entries = entries
		}
	}
	return c, nil
}

// NewMemoryHashCache returns an empty cache that Save never writes: for
// callers that must not touch the disk.
func NewMemoryHashCache() *HashCache { return newHashCache("", "") }

func newHashCache(dir, path string) *HashCache {
	return &HashCache{
		path:    path,
		dir:     dir,
		entries: map[string]*hashEntry{},
		now:     time.Now,
	}
}

// sizeHint guesses how many files the next walk finds.
func (c *HashCache) sizeHint() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// Len is the number of entries Save would write.
func (c *HashCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen
}

// lookup returns the digest cached for path if its stat key is unchanged,
// and keeps the entry for Save.
func (c *HashCache) lookup(path string, key statKey) ([32]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[path]
	if e == nil || e.key != key {
		return [32]byte{}, false
	}
	c.markSeen(e)
	return e.digest, true
}

// store records a freshly computed digest unless the file's timestamps are
// too recent to be trusted (see racyWindow). start is when hashing began.
func (c *HashCache) store(path string, key statKey, digest [32]byte, start time.Time) {
	limit := start.Add(-racyWindow).UnixNano()
	if key.mtime >= limit || key.ctime >= limit {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[path]
	if e == nil {
		e = &hashEntry{}
		c.entries[path] = e
	}
	c.markSeen(e)
	e.key, e.digest = key, digest
	c.dirty = true
}

func (c *HashCache) markSeen(e *hashEntry) {
	if !e.seen {
		e.seen = true
		c.seen++
	}
}

// Save writes the entries seen since the cache was opened, replacing the
// file atomically, and drops all others. It writes nothing when nothing
// changed. Concurrent Saves from other processes are harmless: the last
// rename wins and either version is a valid cache.
func (c *HashCache) Save() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == "" || (!c.dirty && c.seen == len(c.entries)) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(c.path), 0o700); err != nil {
		return fmt.Errorf("save hash cache: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(c.path), filepath.Base(c.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("save hash cache: %w", err)
	}
	// No fsync: after a crash the file may be torn, which the checksum
	// detects, and a lost cache costs one cold hash.
	_, err = tmp.Write(encodeHashCache(c.entries, c.dir))
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), c.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("save hash cache %s: %w", c.path, err)
	}
	// The next walk starts from what was written.
	for p, e := range c.entries {
		if !e.seen {
			delete(c.entries, p)
		}
		e.seen = false
	}
	c.seen, c.dirty = 0, false
	return nil
}

// The file format, all integers unsigned varints unless noted:
//
//	magic "kiln-hashcache\n", version
//	len(dir) dir                      the context directory it belongs to
//	count
//	count × { len(path) path, dev, ino, size, mtime (zigzag), ctime (zigzag), 32-byte digest }
//	4-byte CRC-32C (big-endian) of everything before it
//
// The CRC finds torn writes and bit rot; the cache guards against
// accidents, not an attacker who can write the user's home directory.
// Only entries marked seen are written.
func encodeHashCache(entries map[string]*hashEntry, dir string) []byte {
	buf := make([]byte, 0, 64+len(dir)+len(entries)*(96+len(dir)))
	buf = append(buf, hashCacheMagic...)
	buf = binary.AppendUvarint(buf, hashCacheVersion)
	buf = appendString(buf, dir)
	n := 0
	for _, e := range entries {
		if e.seen {
			n++
		}
	}
	buf = binary.AppendUvarint(buf, uint64(n))
	for p, e := range entries {
		if !e.seen {
			continue
		}
		buf = appendString(buf, p)
		buf = binary.AppendUvarint(buf, e.key.dev)
		buf = binary.AppendUvarint(buf, e.key.ino)
		buf = binary.AppendUvarint(buf, uint64(e.key.size))
		buf = binary.AppendVarint(buf, e.key.mtime)
		buf = binary.AppendVarint(buf, e.key.ctime)
		buf = append(buf, e.digest[:]...)
	}
	return binary.BigEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli))
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var errCorruptCache = errors.New("corrupt hash cache")

// minEntryBytes is the smallest encoded entry: six one-byte varints and
// the digest. It bounds what a count can make decodeHashCache allocate.
const minEntryBytes = 6 + 32

func decodeHashCache(data []byte, dir string) (map[string]*hashEntry, error) {
	if len(data) < len(hashCacheMagic)+4 || !bytes.HasPrefix(data, []byte(hashCacheMagic)) {
		return nil, errCorruptCache
	}
	body, sum := data[:len(data)-4], binary.BigEndian.Uint32(data[len(data)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, errCorruptCache
	}
	// One string for all paths: each key is a substring of it, so loading
	// allocates per file nothing but its map slot.
	r := &byteReader{s: string(body[len(hashCacheMagic):])}
	if r.uvarint() != hashCacheVersion || r.string() != dir {
		return nil, errCorruptCache
	}
	n := r.uvarint()
	if n > uint64(len(r.s))/minEntryBytes {
		return nil, errCorruptCache
	}
	out := make(map[string]*hashEntry, n)
	all := make([]hashEntry, n) // one allocation, not one per entry
	for i := range n {
		p := r.string()
		e := &all[i]
		e.key.dev, e.key.ino = r.uvarint(), r.uvarint()
		e.key.size = int64(r.uvarint())
		e.key.mtime, e.key.ctime = r.varint(), r.varint()
		copy(e.digest[:], r.bytes(32))
		if r.err != nil {
			return nil, errCorruptCache
		}
		out[p] = e
	}
	if r.err != nil || len(r.s) != 0 {
		return nil, errCorruptCache
	}
	return out, nil
}

func appendString(buf []byte, s string) []byte {
	buf = binary.AppendUvarint(buf, uint64(len(s)))
	return append(buf, s...)
}

// byteReader decodes the cache format; the first error sticks.
type byteReader struct {
	s   string
	err error
}

func (r *byteReader) uvarint() uint64 {
	var v uint64
	for i := 0; i < len(r.s) && i < binary.MaxVarintLen64; i++ {
		b := r.s[i]
		v |= uint64(b&0x7f) << (7 * i)
		if b < 0x80 {
			r.s = r.s[i+1:]
			return v
		}
	}
	r.fail()
	return 0
}

func (r *byteReader) varint() int64 {
	u := r.uvarint()
	return int64(u>>1) ^ -int64(u&1) // zigzag, as binary.AppendVarint
}

func (r *byteReader) bytes(n uint64) string {
	if r.err != nil || n > uint64(len(r.s)) {
		r.fail()
		return ""
	}
	out := r.s[:n]
	r.s = r.s[n:]
	return out
}

func (r *byteReader) string() string { return r.bytes(r.uvarint()) }

func (r *byteReader) fail() {
	if r.err == nil {
		r.err = errCorruptCache
	}
	r.s = ""
}

// readBounded reads a whole file of at most limit bytes.
func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > limit {
		return nil, errCorruptCache
	}
	// One read of the size stat gave; a file that grew since is torn
	// anyway, and the checksum says so.
	data := make([]byte, st.Size())
	n, err := io.ReadFull(f, data)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	return data[:n], nil
}

// statKeyOf is the cache key of a regular file's lstat result.
func statKeyOf(info fs.FileInfo) statKey {
	k := statKey{size: info.Size(), mtime: info.ModTime().UnixNano()}
	platformStatKey(info, &k)
	return k
}
