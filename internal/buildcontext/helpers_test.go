package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// ent is one archive entry for tests; zero fields get sensible defaults.
type ent struct {
	name    string
	typ     byte // tar.Type*; TypeReg when zero
	body    string
	mode    int64 // 0644 (files) / 0755 (dirs) unless modeSet
	modeSet bool
	link    string
	mtime   time.Time
	uid     int
	uname   string
	fmt     tar.Format
}

func file(name, body string) ent             { return ent{name: name, body: body} }
func dir(name string) ent                    { return ent{name: name, typ: tar.TypeDir} }
func symlink(name, target string) ent        { return ent{name: name, typ: tar.TypeSymlink, link: target} }
func hardlink(name, target string) ent       { return ent{name: name, typ: tar.TypeLink, link: target} }
func withMode(e ent, mode int64) ent         { e.mode, e.modeSet = mode, true; return e }
func withTime(e ent, t time.Time) ent        { e.mtime = t; return e }
func withOwner(e ent, uid int, n string) ent { e.uid, e.uname = uid, n; return e }

func mkTar(t testing.TB, entries ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.mode
		if !e.modeSet {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		mtime := e.mtime
		if mtime.IsZero() {
			mtime = time.Unix(1700000000, 0)
		}
		hdr := &tar.Header{
			Name: e.name, Typeflag: typ, Mode: mode, Linkname: e.link, ModTime: mtime,
			Uid: e.uid, Gid: e.uid, Uname: e.uname, Gname: e.uname, Format: e.fmt,
		}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatalf("write header %q: %v", e.name, err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zst(t testing.TB, b []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

// paxRecord formats one PAX extended-header record ("<len> key=value\n").
func paxRecord(k, v string) string {
	s := " " + k + "=" + v + "\n"
	for l := len(s) + 1; ; l++ {
		if l == len(s)+len(strconv.Itoa(l)) {
			return strconv.Itoa(l) + s
		}
	}
}

// sparseBomb is a ~2 KiB archive holding one PAX GNU-sparse file whose
// logical size is 1 TiB of holes: tiny on the wire and in the tar stream,
// enormous on disk. archive/tar's Writer will not produce one, so the PAX
// header's type byte is patched in by hand.
func sparseBomb(t testing.TB) []byte {
	t.Helper()
	rec := paxRecord("GNU.sparse.major", "0") + paxRecord("GNU.sparse.minor", "1") +
		paxRecord("GNU.sparse.size", strconv.FormatInt(1<<40, 10)) +
		paxRecord("GNU.sparse.numblocks", "1") + paxRecord("GNU.sparse.map", "0,0")
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: "PaxHeaders/bomb", Typeflag: tar.TypeReg, Size: int64(len(rec)), Mode: 0o644, Format: tar.FormatUSTAR})
	_, _ = tw.Write([]byte(rec))
	_ = tw.WriteHeader(&tar.Header{Name: "bomb", Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatUSTAR})
	_ = tw.Close()
	raw := buf.Bytes()
	return asPAXHeader(raw)
}

// receive runs Receive into a fresh directory under a fresh parent and
// returns the directory (which may not exist on error).
func receive(t testing.TB, data []byte, lim Limits) (string, Info, error) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ctx")
	info, err := Receive(context.Background(), bytes.NewReader(data), dst, lim)
	return dst, info, err
}

func mustReceive(t testing.TB, data []byte) (string, Info) {
	t.Helper()
	dst, info, err := receive(t, data, Limits{})
	if err != nil {
		t.Fatalf("Receive: %v", err)
	}
	return dst, info
}

func hashOf(t testing.TB, data []byte) string {
	t.Helper()
	_, info := mustReceive(t, data)
	return info.Hash
}

// wantError asserts err is an *Error of the errdefs class (nil: the
// server's own fault) and a message containing every fragment, and that
// dir is gone.
func wantError(t testing.TB, err error, dir string, class error, fragments ...string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("got error %v (%T), want *Error", err, err)
	}
	if e.Class != class {
		t.Errorf("class = %v, want %v (message: %s)", e.Class, class, e.Msg)
	}
	if class != nil && !errors.Is(err, class) {
		t.Errorf("errors.Is(err, %v) = false", class)
	}
	for _, f := range fragments {
		if !bytes.Contains([]byte(e.Msg), []byte(f)) {
			t.Errorf("message %q does not contain %q", e.Msg, f)
		}
	}
	if _, statErr := os.Lstat(dir); !errors.Is(statErr, fs.ErrNotExist) {
		t.Errorf("target directory %s still exists after a failed Receive (lstat: %v)", dir, statErr)
	}
	if parent := filepath.Dir(dir); true {
		left, _ := os.ReadDir(parent)
		if len(left) != 0 {
			t.Errorf("files left next to the target directory: %v", left)
		}
	}
	return e
}

// treeEntry is what a directory holds at one path, for comparisons.
type treeEntry struct {
	Type    string
	Mode    fs.FileMode
	Content string
	Link    string
}

func readTree(t testing.TB, root string) map[string]treeEntry {
	t.Helper()
	out := map[string]treeEntry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		e := treeEntry{Mode: info.Mode() & (fs.ModePerm | fs.ModeSticky | fs.ModeSetuid | fs.ModeSetgid)}
		switch {
		case info.Mode().IsRegular():
			e.Type = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.Content = string(b)
		case info.IsDir():
			e.Type = "dir"
		case info.Mode()&fs.ModeSymlink != 0:
			e.Type = "symlink"
			e.Mode = 0
			e.Link, err = os.Readlink(p)
			if err != nil {
				return err
			}
		default:
			e.Type = "other"
		}
		out[filepath.ToSlash(rel)] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func keys[M ~map[string]V, V any](m M) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// asPAXHeader turns the first header of an archive archive/tar wrote as a
// regular file into a PAX extended header (type 'x', checksum redone):
// archive/tar writes PAX records itself but cannot be told which.
func asPAXHeader(raw []byte) []byte {
	raw[156] = tar.TypeXHeader
	var sum int64
	for i := range 512 {
		if i >= 148 && i < 156 {
			sum += ' '
		} else {
			sum += int64(raw[i])
		}
	}
	copy(raw[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return raw
}
