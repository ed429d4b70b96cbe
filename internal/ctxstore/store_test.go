package ctxstore

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/errdefs"
)

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// blobTar is an upload of blobs, each named by its digest unless names
// overrides it.
func blobTar(t *testing.T, blobs [][]byte, names ...string) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i, b := range blobs {
		name := digest(b)
		if i < len(names) {
			name = names[i]
		}
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
	}
	tw.Close()
	return &buf
}

func open(t *testing.T, cfg Config) *Store {
	t.Helper()
	s, err := Open(t.TempDir(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestPutThenMissingSaysWhatIsHeld(t *testing.T) {
	s := open(t, Config{})
	a, b := []byte("alpha"), []byte("beta")
	st, err := s.Put(context.Background(), "team-a", blobTar(t, [][]byte{a}))
	if err != nil || st.Stored != 1 || st.Bytes != 5 {
		t.Fatalf("put: %+v %v", st, err)
	}
	missing, err := s.Missing("team-a", []string{digest(a), digest(b)})
	if err != nil || len(missing) != 1 || missing[0] != digest(b) {
		t.Errorf("missing = %v, %v; want only beta", missing, err)
	}
	if st, _ := s.Put(context.Background(), "team-a", blobTar(t, [][]byte{a})); st.Stored != 0 {
		t.Errorf("a blob held already was stored again: %+v", st)
	}
}

func TestATenantCannotLearnAnotherTenantsBlobs(t *testing.T) {
	s := open(t, Config{})
	secret := []byte("team-a's private file")
	if _, err := s.Put(context.Background(), "team-a", blobTar(t, [][]byte{secret})); err != nil {
		t.Fatal(err)
	}
	missing, _ := s.Missing("team-b", []string{digest(secret)})
	if len(missing) != 1 {
		t.Error("team-b's query revealed that team-a holds a blob")
	}
	if _, _, err := s.Source("team-b").BlobFile(digest(secret), 0o644); !errors.Is(err, buildcontext.ErrMissingBlobs) {
		t.Errorf("team-b materialized team-a's blob: %v", err)
	}
}

func TestBlobsAreVerified(t *testing.T) {
	s := open(t, Config{})
	real := []byte("real content")
	_, err := s.Put(context.Background(), "team-a", blobTar(t, [][]byte{real}, digest([]byte("claimed content"))))
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("a blob under the wrong digest: err = %v, want invalid", err)
	}
	if missing, _ := s.Missing("team-a", []string{digest([]byte("claimed content")), digest(real)}); len(missing) != 2 {
		t.Errorf("a refused blob was stored: missing %v", missing)
	}
	if _, err := s.Put(context.Background(), "team-a", blobTar(t, [][]byte{real}, "../../etc/passwd")); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("a blob not named by a digest: err = %v", err)
	}
	if _, err := s.Missing("team-a", []string{"sha256:../x"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("a query for a non-digest: err = %v", err)
	}
}

func TestBlobFilesHaveTheirModeAndContentTime(t *testing.T) {
	s := open(t, Config{})
	b := []byte("#!/bin/sh\necho hi\n")
	s.Put(context.Background(), "team-a", blobTar(t, [][]byte{b}))
	src := s.Source("team-a")
	defer src.Release()
	var sum [32]byte
	hex.Decode(sum[:], []byte(digest(b)[7:]))
	for _, mode := range []uint32{0o644, 0o755, 0o600} {
		p, size, err := src.BlobFile(digest(b), mode)
		if err != nil || size != int64(len(b)) {
			t.Fatalf("mode %o: %v (size %d)", mode, err, size)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := uint32(fi.Mode().Perm()); got != mode {
			t.Errorf("file for mode %o has mode %o", mode, got)
		}
		if !fi.ModTime().Equal(buildcontext.ContentTime(sum)) {
			t.Errorf("mode %o: mtime %v, want the content's %v", mode, fi.ModTime(), buildcontext.ContentTime(sum))
		}
		data, _ := os.ReadFile(p)
		if !bytes.Equal(data, b) {
			t.Errorf("mode %o: content %q", mode, data)
		}
	}
}

func TestStoreStaysWithinItsBoundsUnderChurn(t *testing.T) {
	const perTenant, total = 64 << 10, 96 << 10
	s := open(t, Config{MaxBytesPerTenant: perTenant, MaxTotalBytes: total})
	blob := func(tenant string, i int) []byte {
		return bytes.Repeat([]byte(fmt.Sprintf("%s-%04d;", tenant, i)), 1024)
	}
	for i := range 200 {
		for _, tn := range []string{"team-a", "team-b", "team-c"} {
			if _, err := s.Put(context.Background(), tn, blobTar(t, [][]byte{blob(tn, i)})); err != nil {
				t.Fatal(err)
			}
			if b, _ := s.Usage(tn); b > perTenant {
				t.Fatalf("%s holds %d bytes, over its bound of %d", tn, b, perTenant)
			}
			if s.TotalBytes() > total {
				t.Fatalf("the store holds %d bytes, over its bound of %d", s.TotalBytes(), total)
			}
		}
	}
	// The newest blobs are kept, the oldest gone.
	missing, _ := s.Missing("team-c", []string{digest(blob("team-c", 199)), digest(blob("team-c", 0))})
	if len(missing) != 1 || missing[0] != digest(blob("team-c", 0)) {
		t.Errorf("after churn, missing %v; want only the oldest", missing)
	}
	// What is on disk agrees with the accounting after a restart.
	again, err := Open(s.dir, s.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if again.TotalBytes() != s.TotalBytes() {
		t.Errorf("reopened store counts %d bytes, was %d", again.TotalBytes(), s.TotalBytes())
	}
}

func TestPinnedBlobsAreNotEvicted(t *testing.T) {
	s := open(t, Config{MaxBytesPerTenant: 5000})
	blob := func(c string) []byte { return bytes.Repeat([]byte(c), 2000) }
	s.Put(context.Background(), "team-a", blobTar(t, [][]byte{blob("o")}))
	src := s.Source("team-a")
	p, _, err := src.BlobFile(digest(blob("o")), 0o644) // now the least recently used, but pinned
	if err != nil {
		t.Fatal(err)
	}
	s.Put(context.Background(), "team-a", blobTar(t, [][]byte{blob("1")}))
	s.Put(context.Background(), "team-a", blobTar(t, [][]byte{blob("2")}))
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("a blob in use by a materialization was evicted: %v", err)
	}
	if missing, _ := s.Missing("team-a", []string{digest(blob("1"))}); len(missing) != 1 {
		t.Error("the store went over its bound instead of evicting an unpinned blob")
	}
	src.Release()
}
