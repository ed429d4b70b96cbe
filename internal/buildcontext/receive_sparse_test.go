package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// frag is one data fragment of a sparse test file; the rest is holes.
type frag struct {
	off  int64
	data []byte
}

// sparseTar is an archive holding one file in the PAX GNU sparse 1.0 format
// (what `tar --sparse --format=pax` writes): logical size size, the given
// data fragments, holes elsewhere. The file's mode and mtime match what
// mkTar gives file(name, ...), so the two extract to the same context.
// archive/tar's Writer drops GNU.sparse.* records, so the PAX header is a
// regular entry whose type byte is patched in by hand, as in sparseBomb.
func sparseTar(t testing.TB, name string, size int64, frags ...frag) []byte {
	t.Helper()
	var sparseMap bytes.Buffer
	fmt.Fprintf(&sparseMap, "%d\n", len(frags))
	for _, f := range frags {
		fmt.Fprintf(&sparseMap, "%d\n%d\n", f.off, len(f.data))
	}
	body := sparseMap.Bytes()
	body = append(body, make([]byte, (512-len(body)%512)%512)...)
	for _, f := range frags {
		body = append(body, f.data...)
	}
	rec := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.realsize", strconv.FormatInt(size, 10))

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 0)
	if err := tw.WriteHeader(&tar.Header{Name: "PaxHeaders/" + name, Typeflag: tar.TypeReg, Size: int64(len(rec)), Mode: 0o644, ModTime: mtime, Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte(rec)); err != nil {
		t.Fatal(err)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "GNUSparseFile.0/" + name, Typeflag: tar.TypeReg, Size: int64(len(body)), Mode: 0o644, ModTime: mtime, Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	raw := buf.Bytes()
	return asPAXHeader(raw)
}

// logical is the content a sparse file of the given size and fragments
// stands for: the fragments, zeros elsewhere.
func logical(size int64, frags ...frag) []byte {
	b := make([]byte, size)
	for _, f := range frags {
		copy(b[f.off:], f.data)
	}
	return b
}

func filled(n int, c byte) []byte { return bytes.Repeat([]byte{c}, n) }

// allocated is the space a file takes on disk, holes excluded.
func allocated(t testing.TB, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// requireHoles skips the test if dir's filesystem does not keep holes.
func requireHoles(t *testing.T, dir string) {
	t.Helper()
	p := filepath.Join(dir, "probe")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{1}, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	if allocated(t, p) >= 64<<20 {
		t.Skipf("the filesystem of %s does not support sparse files", dir)
	}
}

func TestReceiveSparseFileStaysSparse(t *testing.T) {
	requireHoles(t, t.TempDir())
	const size = 1 << 30
	for _, tc := range []struct {
		name  string
		frags []frag
	}{
		{"ends in a hole", []frag{
			{0, filled(4096, 'a')},
			{300<<20 + 1234, filled(100<<10, 'b')}, // not block aligned
			{700 << 20, append(append(filled(5000, 'c'), make([]byte, 64<<10)...), filled(3000, 'd')...)}, // zeros inside data
		}},
		{"ends in data", []frag{
			{512 << 20, filled(1, 'e')},
			{size - 70000, filled(70000, 'f')},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := sparseTar(t, "disk.img", size, tc.frags...)
			// The declared size counts against the limit, and exactly at
			// the limit is accepted.
			dst, info, err := receive(t, data, Limits{MaxUncompressedBytes: size})
			if err != nil {
				t.Fatalf("Receive: %v", err)
			}
			if info.UncompressedBytes != int64(len(data)) {
				t.Errorf("UncompressedBytes = %d, want the %d bytes of the tar", info.UncompressedBytes, len(data))
			}
			p := filepath.Join(dst, "disk.img")
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != size {
				t.Errorf("size = %d, want %d", fi.Size(), size)
			}
			if fi.Mode().Perm() != 0o644 {
				t.Errorf("mode = %v, want 0644", fi.Mode().Perm())
			}
			if got := allocated(t, p); got > 4<<20 {
				t.Errorf("a %d-byte archive declaring a %d-byte sparse file took %d bytes on disk, want holes kept as holes (at most 4 MiB)", len(data), size, got)
			} else {
				t.Logf("%d-byte archive, %d-byte file, %d bytes allocated", len(data), size, got)
			}
			checkSparseContent(t, p, size, tc.frags)
		})
	}
}

// checkSparseContent reads the file back around every fragment, at its
// start and end and every 16 MiB, and compares that with the fragments and
// zeros elsewhere. (Reading all of a 1 GiB file takes seconds;
// TestReceiveSparseHashEqualsPlain compares smaller files in full.)
func checkSparseContent(t *testing.T, p string, size int64, frags []frag) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type span struct{ lo, hi int64 }
	spans := []span{{0, 1 << 20}, {size - 1<<20, size}}
	for off := int64(0); off < size; off += 16 << 20 {
		spans = append(spans, span{off, off + 4096})
	}
	for _, fr := range frags {
		spans = append(spans, span{fr.off - 8192, fr.off + int64(len(fr.data)) + 8192})
	}
	for _, s := range spans {
		lo, hi := max(s.lo, 0), min(s.hi, size)
		got := make([]byte, hi-lo)
		if _, err := f.ReadAt(got, lo); err != nil {
			t.Fatalf("reading %d bytes at %d: %v", len(got), lo, err)
		}
		want := make([]byte, len(got))
		for _, fr := range frags {
			a, b := max(fr.off, lo), min(fr.off+int64(len(fr.data)), hi)
			if a < b {
				copy(want[a-lo:b-lo], fr.data[a-fr.off:b-fr.off])
			}
		}
		if !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Fatalf("byte %d = %#x, want %#x", lo+int64(i), got[i], want[i])
		}
	}
}

func TestReceiveSparseHashEqualsPlain(t *testing.T) {
	const size = 4 << 20
	for _, tc := range []struct {
		name  string
		frags []frag
	}{
		{"ends in a hole", []frag{{0, filled(10, 'a')}, {1<<20 + 17, filled(200<<10, 'b')}}},
		{"ends in data", []frag{{3 << 20, filled(1<<20, 'c')}}},
		{"data with zero blocks", []frag{{4096, append(make([]byte, 128<<10), 'x')}, {2 << 20, make([]byte, 8192)}}},
		{"all hole", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			content := logical(size, tc.frags...)
			sparseDir, sparse := mustReceive(t, sparseTar(t, "f", size, tc.frags...))
			plainDir, plain := mustReceive(t, mkTar(t, file("f", string(content))))
			if sparse.Hash != plain.Hash {
				t.Errorf("sparse archive hashes to %s, the plain archive of the same content to %s", sparse.Hash, plain.Hash)
			}
			got, err := os.ReadFile(filepath.Join(sparseDir, "f"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, content) {
				t.Error("the sparse file does not read back as its logical content")
			}
			if a, b := readTree(t, sparseDir), readTree(t, plainDir); !equalTrees(a, b) {
				t.Error("the sparse and the plain archive extract to different trees")
			}
		})
	}
}

func TestReceiveSparseDeclaredSizeCountsAgainstLimit(t *testing.T) {
	// The archives are a few KiB, far below the limit: only the declared
	// size, counted before the file is created, can exceed it.
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"alone", sparseTar(t, "big", 1<<30+1, frag{0, filled(10, 'a')})},
		{"after other files", append(
			mkTar(t, file("small", string(filled(1<<20, 's'))))[:512+1<<20], // without the end-of-archive blocks
			sparseTar(t, "big", 1<<30-1<<20+1, frag{1 << 20, filled(10, 'a')})...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst, _, err := receive(t, tc.data, Limits{MaxUncompressedBytes: 1 << 30})
			wantError(t, err, dst, errdefs.ErrTooLarge, "1 GiB limit when uncompressed", "context.max_uncompressed_bytes")
		})
	}
}

func TestReceiveSparseCancel(t *testing.T) {
	// A hole is produced without reading the upload, so cancellation has to
	// be noticed while writing it, not only when the upload is read.
	data := sparseTar(t, "huge", 1<<50, frag{0, filled(10, 'a')})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	dst := filepath.Join(t.TempDir(), "ctx")
	done := make(chan error, 1)
	go func() {
		_, err := Receive(ctx, bytes.NewReader(data), dst, Limits{})
		done <- err
	}()
	select {
	case err := <-done:
		e := wantError(t, err, dst, errdefs.ErrTimeout, "took too long")
		if !errors.Is(e, context.DeadlineExceeded) {
			t.Error("error does not wrap context.DeadlineExceeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Receive did not stop when its context expired while writing a sparse file's holes")
	}
}
