package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/errdefs"
)

func sampleTar(t testing.TB) []byte {
	return mkTar(t,
		dir("src/"),
		file("src/main.go", "package main\n"),
		withMode(file("run.sh", "#!/bin/sh\necho hi\n"), 0o755),
		symlink("link", "src/main.go"),
		hardlink("src/again.go", "src/main.go"),
		dir("empty/"),
	)
}

func TestReceiveAcceptsTarGzipAndZstd(t *testing.T) {
	plain := sampleTar(t)
	var hashes []string
	for _, tc := range []struct {
		format string
		data   []byte
	}{
		{FormatTar, plain},
		{FormatGzip, gz(t, plain)},
		{FormatZstd, zst(t, plain)},
	} {
		t.Run(tc.format, func(t *testing.T) {
			dst, info := mustReceive(t, tc.data)
			if info.Format != tc.format {
				t.Errorf("Format = %q, want %q", info.Format, tc.format)
			}
			if info.Bytes != int64(len(tc.data)) {
				t.Errorf("Bytes = %d, want the %d bytes uploaded", info.Bytes, len(tc.data))
			}
			if info.UncompressedBytes != int64(len(plain)) {
				t.Errorf("UncompressedBytes = %d, want the %d bytes of the tar", info.UncompressedBytes, len(plain))
			}
			if info.Entries != 6 {
				t.Errorf("Entries = %d, want 6", info.Entries)
			}
			got := readTree(t, dst)
			want := map[string]treeEntry{
				"empty":        {Type: "dir", Mode: 0o755},
				"link":         {Type: "symlink", Link: "src/main.go"},
				"run.sh":       {Type: "file", Mode: 0o755, Content: "#!/bin/sh\necho hi\n"},
				"src":          {Type: "dir", Mode: 0o755},
				"src/again.go": {Type: "file", Mode: 0o644, Content: "package main\n"},
				"src/main.go":  {Type: "file", Mode: 0o644, Content: "package main\n"},
			}
			if !equalTrees(got, want) {
				t.Errorf("extracted tree:\n%v\nwant:\n%v", got, want)
			}
			a, _ := os.Stat(filepath.Join(dst, "src/main.go"))
			b, _ := os.Stat(filepath.Join(dst, "src/again.go"))
			if !os.SameFile(a, b) {
				t.Error("hard link was extracted as a copy")
			}
			if st, _ := os.Stat(dst); st.Mode().Perm() != 0o700 {
				t.Errorf("context root mode = %v, want 0700 so other users cannot reach in", st.Mode().Perm())
			}
			if !strings.HasPrefix(info.Hash, "sha256:") || len(info.Hash) != 71 {
				t.Errorf("Hash = %q, want sha256:<64 hex>", info.Hash)
			}
			hashes = append(hashes, info.Hash)
		})
	}
	if len(hashes) == 3 && (hashes[0] != hashes[1] || hashes[1] != hashes[2]) {
		t.Errorf("the same tar hashed differently per compression: %v", hashes)
	}
}

func equalTrees(a, b map[string]treeEntry) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestReceiveRejectsBadContexts(t *testing.T) {
	random := make([]byte, 64<<10)
	_, _ = rand.Read(random)
	big := mkTar(t, file("random.bin", string(random)))
	zeros := mkTar(t, file("zeros.bin", strings.Repeat("\x00", 4<<20)))
	many := make([]ent, 0, 20)
	for i := range 20 {
		many = append(many, file("f"+string(rune('a'+i)), "x"))
	}
	truncated := gz(t, sampleTar(t))
	truncated = truncated[:len(truncated)-20]
	badCRC := gz(t, sampleTar(t))
	badCRC[len(badCRC)-6] ^= 0xff

	cases := []struct {
		name  string
		data  []byte
		lim   Limits
		class error
		msg   []string
	}{
		{"absolute path", mkTar(t, file("/etc/passwd", "root")), Limits{}, errdefs.ErrInvalid,
			[]string{`context entry "/etc/passwd" has an absolute path`}},
		{"dot-dot", mkTar(t, file("../etc/passwd", "root")), Limits{}, errdefs.ErrInvalid,
			[]string{`context entry "../etc/passwd" escapes the context root`}},
		{"dot-dot in the middle", mkTar(t, dir("a/"), file("a/../../x", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{`context entry "a/../../x" escapes the context root`}},
		{"hard link outside", mkTar(t, hardlink("pw", "../../etc/passwd")), Limits{}, errdefs.ErrInvalid,
			[]string{`"pw" is a hard link to "../../etc/passwd", which is outside the context`}},
		{"hard link absolute", mkTar(t, hardlink("pw", "/etc/passwd")), Limits{}, errdefs.ErrInvalid,
			[]string{`which is outside the context`}},
		{"hard link before its target", mkTar(t, hardlink("early", "late"), file("late", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{`"early" is a hard link to "late", which is not a regular file that appears earlier`}},
		{"hard link to a directory", mkTar(t, dir("d/"), hardlink("l", "d")), Limits{}, errdefs.ErrInvalid,
			[]string{`not a regular file`}},
		{"symlink absolute", mkTar(t, symlink("etc", "/etc")), Limits{}, errdefs.ErrInvalid,
			[]string{`"etc" is a symlink to the absolute path "/etc", which escapes the context root`}},
		{"symlink relative escape", mkTar(t, dir("a/"), symlink("a/up", "../../secret")), Limits{}, errdefs.ErrInvalid,
			[]string{`"a/up" is a symlink to "../../secret", which points outside the context root`}},
		{"symlink escape through a chain", mkTar(t, dir("x/"), symlink("x/up", ".."), symlink("y", "x/up/..")), Limits{}, errdefs.ErrInvalid,
			[]string{`"y" is a symlink to "x/up/..", which resolves outside the context root through other symlinks`}},
		{"write through a symlink", mkTar(t, dir("real/"), symlink("l", "real"), file("l/evil", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{`context entry "l/evil" would be written through the symlink "l"`}},
		{"write through a symlink to the root", mkTar(t, symlink("l", "."), file("l/l/evil", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{`would be written through the symlink "l"`}},
		{"directory replaced by a symlink", mkTar(t, dir("d/"), file("d/f", "x"), symlink("d", "elsewhere")), Limits{}, errdefs.ErrInvalid,
			[]string{`"d" would replace a directory with a symlink`}},
		{"character device", mkTar(t, ent{name: "null", typ: tar.TypeChar}), Limits{}, errdefs.ErrInvalid,
			[]string{`context entry "null" is a device node`, "remove it"}},
		{"block device", mkTar(t, ent{name: "sda", typ: tar.TypeBlock}), Limits{}, errdefs.ErrInvalid,
			[]string{`"sda" is a device node`}},
		{"fifo", mkTar(t, ent{name: "pipe", typ: tar.TypeFifo}), Limits{}, errdefs.ErrInvalid,
			[]string{`"pipe" is a named pipe`}},
		{"over max bytes", gz(t, big), Limits{MaxBytes: 32 << 10}, errdefs.ErrTooLarge,
			[]string{"context is larger than the 32 KiB limit (context.max_bytes)", ".dockerignore"}},
		{"over max uncompressed bytes", gz(t, zeros), Limits{MaxUncompressedBytes: 1 << 20}, errdefs.ErrTooLarge,
			[]string{"context is larger than the 1 MiB limit when uncompressed (context.max_uncompressed_bytes)"}},
		{"sparse file bomb", sparseBomb(t), Limits{MaxUncompressedBytes: 1 << 30}, errdefs.ErrTooLarge,
			[]string{"1 GiB limit when uncompressed"}},
		{"over max entries", mkTar(t, many...), Limits{MaxEntries: 10}, errdefs.ErrTooLarge,
			[]string{"more than 10 files and directories", "context.max_entries"}},
		{"implied directories count as entries", mkTar(t, file("a/b/c/d/e/f/g/h/i/j/k/l", "x")), Limits{MaxEntries: 5}, errdefs.ErrTooLarge,
			[]string{"more than 5 files and directories"}},
		{"garbage", random[:4096], Limits{}, errdefs.ErrInvalid,
			[]string{"is not a valid tar archive", "send a tar, tar.gz or tar.zst"}},
		{"truncated gzip", truncated, Limits{}, errdefs.ErrInvalid,
			[]string{"ends unexpectedly", "re-send the complete archive"}},
		{"gzip with a bad checksum", badCRC, Limits{}, errdefs.ErrInvalid,
			[]string{"not a valid tar.gz archive"}},
		{"empty upload", nil, Limits{}, errdefs.ErrInvalid,
			[]string{"upload is empty"}},
		{"xz", append([]byte{0xfd, '7', 'z', 'X', 'Z', 0}, random[:100]...), Limits{}, errdefs.ErrInvalid,
			[]string{"compressed with xz"}},
		{"too deep", mkTar(t, file(strings.Repeat("d/", 300)+"f", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{"nested more than 256 directories deep"}},
		{"symlink escape through a long chain", mkTar(t, append([]ent{dir("x/"), symlink("x/up", ".."), symlink("l0", "x/up")}, chain(200)...)...), Limits{}, errdefs.ErrInvalid,
			[]string{"through other symlinks"}},
		{"invalid .dockerignore pattern", mkTar(t, file(".dockerignore", "a[\n"), file("a", "x")), Limits{}, errdefs.ErrInvalid,
			[]string{"invalid pattern in .dockerignore", "fix the context's .dockerignore"}},
		{".dockerignore is a directory", mkTar(t, dir(".dockerignore/")), Limits{}, errdefs.ErrInvalid,
			[]string{".dockerignore is a directory"}},
		{"long path component", mkTar(t, file(strings.Repeat("a", 300), "x")), Limits{}, errdefs.ErrInvalid,
			[]string{"path component longer than 255 bytes"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst, _, err := receive(t, tc.data, tc.lim)
			wantError(t, err, dst, tc.class, tc.msg...)
		})
	}
}

// chain makes l1..ln, each pointing at the previous one and then "..".
// Resolved alone each looks harmless; resolved through l0 (which lands on
// the root) the first ".." leaves the context.
func chain(n int) []ent {
	var out []ent
	for i := 1; i <= n; i++ {
		out = append(out, symlink("l"+strconv.Itoa(i), "l"+strconv.Itoa(i-1)+"/.."))
	}
	return out
}

func TestReceiveAcceptsHarmlessSymlinks(t *testing.T) {
	dst, _ := mustReceive(t, mkTar(t,
		dir("a/"), dir("a/b/"),
		symlink("a/b/up", "../.."),                           // the root itself
		symlink("a/b/sib", "../b/./up"),                      // through another link, still the root
		symlink("loop1", "loop2"), symlink("loop2", "loop1"), // ELOOP, reaches nothing
		symlink("dangling", "nowhere/at/all"),
		file("f", "x"), symlink("notdir", "f/.."), // ENOTDIR
	))
	if got := readTree(t, dst); got["a/b/sib"].Link != "../b/./up" || got["loop1"].Link != "loop2" {
		t.Errorf("links not extracted as archived: %v", got)
	}
}

func TestReceiveLimitsAreInclusive(t *testing.T) {
	data := gz(t, sampleTar(t))
	lim := Limits{MaxBytes: int64(len(data)), MaxUncompressedBytes: int64(len(sampleTar(t))), MaxEntries: 6}
	if _, _, err := receive(t, data, lim); err != nil {
		t.Fatalf("a context exactly at every limit was refused: %v", err)
	}
}

func TestReceiveNeverFollowsSymlinksOnOverwrite(t *testing.T) {
	// A later regular file at the path of an earlier symlink replaces the
	// link; it must not write into the link's target.
	dst, _ := mustReceive(t, mkTar(t,
		file("target", "original"),
		symlink("l", "target"),
		file("l", "replacement"),
	))
	got := readTree(t, dst)
	if got["target"].Content != "original" {
		t.Errorf("target = %q: the replacement was written through the symlink", got["target"].Content)
	}
	if got["l"].Type != "file" || got["l"].Content != "replacement" {
		t.Errorf("l = %+v, want a regular file with the replacement", got["l"])
	}
}

func TestReceiveModes(t *testing.T) {
	dst, _ := mustReceive(t, mkTar(t,
		withMode(dir("ro/"), 0o555),
		withMode(file("ro/inside", "x"), 0o400),
		withMode(dir("shared/"), 0o1777),
		withMode(file("suid", "x"), 0o4755),
		withMode(file("sgid", "x"), 0o2711),
		withMode(file("none", "x"), 0o000),
	))
	got := readTree(t, dst)
	want := map[string]fs.FileMode{
		"ro":        0o555,
		"ro/inside": 0o400,
		"shared":    0o777 | fs.ModeSticky,
		"suid":      0o755, // setuid dropped
		"sgid":      0o711, // setgid dropped
		"none":      0,
	}
	for p, m := range want {
		if got[p].Mode != m {
			t.Errorf("%s mode = %v, want %v", p, got[p].Mode, m)
		}
	}
}

func TestReceiveLongNames(t *testing.T) {
	long := strings.Repeat("directory-", 12) + "/" + strings.Repeat("file-name-", 15) + ".txt"
	target := strings.Repeat("../", 1) + strings.Repeat("x", 150)
	for _, format := range []tar.Format{tar.FormatPAX, tar.FormatGNU} {
		t.Run(format.String(), func(t *testing.T) {
			dst, _ := mustReceive(t, gz(t, mkTar(t,
				ent{name: strings.Repeat("directory-", 12) + "/", typ: tar.TypeDir, fmt: format},
				ent{name: long, body: "deep", fmt: format},
				ent{name: strings.Repeat("directory-", 12) + "/link", typ: tar.TypeSymlink, link: target, fmt: format},
			)))
			got := readTree(t, dst)
			if got[long].Content != "deep" {
				t.Errorf("long name not extracted: %v", keys(got))
			}
			if l := got[strings.Repeat("directory-", 12)+"/link"].Link; l != target {
				t.Errorf("long link target = %q, want %q", l, target)
			}
		})
	}
}

func TestReceiveImpliedParents(t *testing.T) {
	dst, implied := mustReceive(t, mkTar(t, file("a/b/c.txt", "c")))
	if got := readTree(t, dst); got["a/b"].Type != "dir" || got["a/b/c.txt"].Content != "c" {
		t.Fatalf("implied parents not created: %v", got)
	}
	_, explicit := mustReceive(t, mkTar(t, dir("a/"), dir("a/b/"), file("a/b/c.txt", "c")))
	if implied.Hash != explicit.Hash {
		t.Error("a tree hashed differently depending on whether its 0755 parents were archived")
	}
}

func TestReceiveTargetDirectory(t *testing.T) {
	t.Run("existing empty directory is used", func(t *testing.T) {
		dst := t.TempDir()
		if _, err := Receive(context.Background(), bytes.NewReader(sampleTar(t)), dst, Limits{}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(dst, "src/main.go")); err != nil {
			t.Error(err)
		}
	})
	t.Run("non-empty directory is refused and left alone", func(t *testing.T) {
		dst := t.TempDir()
		keep := filepath.Join(dst, "keep")
		if err := os.WriteFile(keep, []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := Receive(context.Background(), bytes.NewReader(sampleTar(t)), dst, Limits{})
		var e *Error
		if !errors.As(err, &e) || e.Class != nil {
			t.Fatalf("err = %v, want a 500 *Error", err)
		}
		if b, err := os.ReadFile(keep); err != nil || string(b) != "precious" {
			t.Errorf("pre-existing content was touched: %q, %v", b, err)
		}
	})
	t.Run("existing empty directory is removed on failure", func(t *testing.T) {
		dst := filepath.Join(t.TempDir(), "ctx")
		if err := os.Mkdir(dst, 0o755); err != nil {
			t.Fatal(err)
		}
		_, err := Receive(context.Background(), bytes.NewReader(mkTar(t, file("../x", ""))), dst, Limits{})
		wantError(t, err, dst, errdefs.ErrInvalid)
	})
}

// stallingReader hands out data, then blocks until released, like a client
// that stops sending mid-upload.
type stallingReader struct {
	data    []byte
	started chan struct{}
	release chan struct{}
}

func (s *stallingReader) Read(p []byte) (int, error) {
	if len(s.data) > 0 {
		n := copy(p, s.data)
		s.data = s.data[n:]
		return n, nil
	}
	select {
	case <-s.started:
	default:
		close(s.started)
	}
	<-s.release
	return 0, io.ErrUnexpectedEOF
}

func TestReceiveCancel(t *testing.T) {
	full := mkTar(t, file("a", strings.Repeat("a", 100<<10)), file("b", strings.Repeat("b", 100<<10)))
	src := &stallingReader{data: full[:150<<10], started: make(chan struct{}), release: make(chan struct{})}
	defer close(src.release)

	ctx, cancel := context.WithCancel(context.Background())
	dst := filepath.Join(t.TempDir(), "ctx")
	done := make(chan error, 1)
	go func() {
		_, err := Receive(ctx, src, dst, Limits{})
		done <- err
	}()
	select {
	case <-src.started:
	case err := <-done:
		t.Fatalf("Receive returned before the upload stalled: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dst, "a")); err != nil {
		t.Fatalf("the first file should be on disk while the upload is stalled: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		e := wantError(t, err, dst, errdefs.ErrCanceled, "canceled")
		if !errors.Is(e, context.Canceled) {
			t.Error("error does not wrap context.Canceled")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Receive did not return after its context was canceled while the reader blocked")
	}
}

func TestReceiveDeadline(t *testing.T) {
	src := &stallingReader{data: sampleTar(t)[:600], started: make(chan struct{}), release: make(chan struct{})}
	defer close(src.release)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	dst := filepath.Join(t.TempDir(), "ctx")
	_, err := Receive(ctx, src, dst, Limits{})
	e := wantError(t, err, dst, errdefs.ErrTimeout, "took too long")
	if !errors.Is(e, context.DeadlineExceeded) {
		t.Error("error does not wrap context.DeadlineExceeded")
	}
}

type failingReader struct{ data []byte }

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, errors.New("connection reset by peer")
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

func TestReceiveUploadError(t *testing.T) {
	data := gz(t, sampleTar(t))
	dst := filepath.Join(t.TempDir(), "ctx")
	_, err := Receive(context.Background(), &failingReader{data: data[:len(data)/2]}, dst, Limits{})
	wantError(t, err, dst, errdefs.ErrInvalid, "reading the build context upload failed (connection reset by peer)")
}
