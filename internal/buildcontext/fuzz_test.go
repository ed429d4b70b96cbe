package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/errdefs"
)

var updateFuzzCorpus = flag.Bool("update-fuzz-corpus", false, "rewrite testdata/fuzz/FuzzReceive from fuzzSeeds")

const fuzzCorpusDir = "testdata/fuzz/FuzzReceive"

// fuzzSeeds are archives that get the fuzzer close to the interesting
// decisions: every rejection path, plus valid archives of every shape. They
// are committed under testdata (so `go test` replays them) by
// `go test -run TestFuzzCorpusIsCommitted -update-fuzz-corpus`.
func fuzzSeeds(tb testing.TB) map[string][]byte {
	valid := mkTar(tb,
		dir("d/"), file("d/f", "hello"), withMode(file("x", "#!"), 0o755),
		symlink("l", "d/f"), hardlink("h", "d/f"), file(".dockerignore", "*.log\n!keep.log\n"),
		file("a.log", "1"), file("keep.log", "2"),
	)
	return map[string][]byte{
		"valid-tar":          valid,
		"valid-gzip":         gz(tb, valid),
		"valid-zstd":         zst(tb, valid),
		"valid-pax-long":     mkTar(tb, ent{name: strings.Repeat("p/", 70) + "f", body: "x", fmt: tar.FormatPAX}),
		"valid-gnu-long":     mkTar(tb, ent{name: strings.Repeat("g/", 70) + "f", body: "x", fmt: tar.FormatGNU}),
		"dotdot":             mkTar(tb, file("../outside/canary", "pwned")),
		"absolute":           mkTar(tb, file("/tmp/kiln-fuzz-absolute", "pwned")),
		"symlink-out":        mkTar(tb, symlink("l", "../outside"), file("l/canary", "pwned")),
		"symlink-abs":        mkTar(tb, symlink("l", "/tmp"), file("l/kiln-fuzz", "pwned")),
		"symlink-chain":      mkTar(tb, dir("x/"), symlink("x/up", ".."), symlink("y", "x/up/../outside"), file("y/canary", "pwned")),
		"write-through":      mkTar(tb, dir("d/"), symlink("l", "d"), file("l/f", "x")),
		"replace-then-write": mkTar(tb, dir("d/"), symlink("d", ".."), file("d/outside/canary", "pwned")),
		"hardlink-out":       mkTar(tb, hardlink("h", "../outside/canary")),
		"hardlink-early":     mkTar(tb, hardlink("h", "f"), file("f", "x")),
		"device":             mkTar(tb, ent{name: "null", typ: tar.TypeChar}),
		"fifo":               mkTar(tb, ent{name: "p", typ: tar.TypeFifo}),
		"sparse-bomb":        sparseBomb(tb),
		"dockerignore-link":  mkTar(tb, symlink(".dockerignore", "../outside/canary")),
	}
}

func FuzzReceive(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		parent := t.TempDir()
		outside := filepath.Join(parent, "outside")
		if err := os.Mkdir(outside, 0o755); err != nil {
			t.Fatal(err)
		}
		canary := filepath.Join(outside, "canary")
		if err := os.WriteFile(canary, []byte("canary"), 0o644); err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(parent, "ctx")

		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		info, err := Receive(ctx, bytes.NewReader(data), dst, Limits{MaxBytes: 1 << 20, MaxUncompressedBytes: 8 << 20, MaxEntries: 2000})

		// Nothing next to the target, nothing changed outside it.
		var names []string
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			names = append(names, e.Name())
		}
		wantNames := "outside"
		if err == nil {
			wantNames = "ctx,outside"
		}
		if got := strings.Join(names, ","); got != wantNames {
			t.Fatalf("parent directory holds %s, want %s (err: %v)", got, wantNames, err)
		}
		if out, _ := os.ReadDir(outside); len(out) != 1 {
			t.Fatalf("something was written into the sibling directory: %v", out)
		}
		if st, err := os.Lstat(canary); err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o644 {
			t.Fatalf("canary changed: %v %v", st, err)
		}
		if b, _ := os.ReadFile(canary); string(b) != "canary" {
			t.Fatalf("canary overwritten with %q", b)
		}

		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is %T, want *Error", err, err)
			}
			if !errors.Is(e, errdefs.ErrInvalid) {
				t.Fatalf("class %v for arbitrary input (%s): only invalid and too large are the client's fault", e.Class, e.Msg)
			}
			return
		}
		if info.Bytes != int64(len(data)) {
			t.Fatalf("Bytes = %d, want %d", info.Bytes, len(data))
		}
		checkExtractedTree(t, dst)
	})
}

// checkExtractedTree checks an accepted context on disk, independently of
// the extractor's own bookkeeping: only files, directories and symlinks, no
// setuid/setgid, and every symlink resolves inside the root according to
// os.Root's own resolver.
func checkExtractedTree(t *testing.T, dst string) {
	root, err := os.OpenRoot(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	err = filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		m := info.Mode()
		if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
			return fmt.Errorf("%s kept setuid/setgid: %v", p, m)
		}
		switch {
		case m.IsRegular(), m.IsDir():
		case m&fs.ModeSymlink != 0:
			rel, _ := filepath.Rel(dst, p)
			if _, err := root.Stat(rel); err != nil && strings.Contains(err.Error(), "escapes") {
				target, _ := os.Readlink(p)
				return fmt.Errorf("symlink %s -> %s escapes the root: %v", rel, target, err)
			}
		default:
			return fmt.Errorf("%s has mode %v", p, m)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestFuzzCorpusIsCommitted(t *testing.T) {
	for name, data := range fuzzSeeds(t) {
		p := filepath.Join(fuzzCorpusDir, "seed-"+name)
		if *updateFuzzCorpus {
			if err := os.MkdirAll(fuzzCorpusDir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", data), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if _, err := os.Stat(p); err != nil {
			t.Errorf("seed %q is not in the committed corpus; run go test -run TestFuzzCorpusIsCommitted -update-fuzz-corpus", name)
		}
	}
}
