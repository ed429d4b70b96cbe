package buildcontext

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"syscall"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// blobDir is a BlobSource over a directory, the way internal/ctxstore
// serves one (its real side is tested there and end to end).
type blobDir struct {
	t   testing.TB
	dir string
}

func newBlobDir(t testing.TB, contents ...string) *blobDir {
	b := &blobDir{t: t, dir: t.TempDir()}
	for _, c := range contents {
		b.add(c)
	}
	return b
}

func (b *blobDir) add(content string) string {
	sum := sha256.Sum256([]byte(content))
	p := filepath.Join(b.dir, hex.EncodeToString(sum[:]))
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		b.t.Fatal(err)
	}
	mt := ContentTime(sum)
	os.Chtimes(p, mt, mt)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b *blobDir) BlobFile(digest string, mode uint32) (string, int64, error) {
	base := filepath.Join(b.dir, digest[len("sha256:"):])
	fi, err := os.Stat(base)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %s", ErrMissingBlobs, digest)
	}
	p := fmt.Sprintf("%s.m%o", base, mode)
	if _, err := os.Stat(p); err != nil {
		data, _ := os.ReadFile(base)
		os.WriteFile(p, data, 0o600)
		os.Chmod(p, os.FileMode(mode))
		os.Chtimes(p, fi.ModTime(), fi.ModTime())
	}
	return p, fi.Size(), nil
}

func dg(content string) string {
	sum := sha256.Sum256([]byte(content))
	return "sha256:" + hex.EncodeToString(sum[:])
}

func fileEntry(p, content string, mode uint32) ManifestEntry {
	return ManifestEntry{Path: p, Type: EntryFile, Mode: mode, Size: int64(len(content)), Digest: dg(content)}
}

func materialize(t testing.TB, m Manifest, blobs BlobSource, lim Limits) (string, Info, error) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ctx")
	info, err := Materialize(context.Background(), m, blobs, dst, lim)
	return dst, info, err
}

// A manifest and a tar of the same tree give the same tree on disk and
// the same context hash: dedup does not care how a context was sent.
func TestManifestAndTarOfOneTreeAreOneContext(t *testing.T) {
	tarDir, tarInfo := mustReceive(t, mkTar(t,
		file(".dockerignore", "*.log\n"),
		dir("src"),
		withMode(file("src/run.sh", "#!/bin/sh\n"), 0o755),
		file("src/main.go", "package main\n"),
		hardlink("src/copy.go", "src/main.go"),
		symlink("latest", "src/main.go"),
		withMode(dir("tmp"), 0o1777),
		file("debug.log", "ignored\n"),
	))
	blobs := newBlobDir(t, "*.log\n", "#!/bin/sh\n", "package main\n", "ignored\n")
	m := Manifest{Version: ManifestVersion, Entries: []ManifestEntry{
		fileEntry(".dockerignore", "*.log\n", 0o644),
		{Path: "src", Type: EntryDir, Mode: 0o755},
		fileEntry("src/run.sh", "#!/bin/sh\n", 0o755),
		fileEntry("src/main.go", "package main\n", 0o644),
		{Path: "src/copy.go", Type: EntryHardlink, Target: "src/main.go"},
		{Path: "latest", Type: EntrySymlink, Target: "src/main.go"},
		{Path: "tmp", Type: EntryDir, Mode: 0o1777},
		fileEntry("debug.log", "ignored\n", 0o644),
	}}
	dst, info, err := materialize(t, m, blobs, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Hash != tarInfo.Hash {
		t.Errorf("manifest hash %s, tar hash %s", info.Hash, tarInfo.Hash)
	}
	if !reflect.DeepEqual(readTree(t, dst), readTree(t, tarDir)) {
		t.Errorf("trees differ:\nmanifest %v\ntar      %v", readTree(t, dst), readTree(t, tarDir))
	}
	if info.Format != FormatManifest || info.UncompressedBytes != int64(len("*.log\n#!/bin/sh\npackage main\nignored\n")) {
		t.Errorf("info = %+v", info)
	}
	// Files are links to the blobs, with the content's mtime: nothing was
	// copied, and BuildKit sees content changes as mtime changes.
	fi, _ := os.Stat(filepath.Join(dst, "src/main.go"))
	if fi.Sys().(*syscall.Stat_t).Nlink < 2 {
		t.Error("src/main.go is a copy, not a link to its blob")
	}
	var sum [32]byte
	hex.Decode(sum[:], []byte(dg("package main\n")[7:]))
	if !fi.ModTime().Equal(ContentTime(sum)) {
		t.Errorf("mtime %v, want the content time", fi.ModTime())
	}
	tfi, _ := os.Stat(filepath.Join(tarDir, "src/main.go"))
	if !tfi.ModTime().Equal(fi.ModTime()) {
		t.Errorf("a tar upload's file has mtime %v, the manifest's %v: BuildKit would resend it", tfi.ModTime(), fi.ModTime())
	}
}

func TestManifestRefusesWhatATarWouldBeRefusedFor(t *testing.T) {
	blobs := newBlobDir(t, "x")
	cases := []struct {
		name  string
		e     []ManifestEntry
		class error
		want  string
	}{
		{"escape", []ManifestEntry{fileEntry("../x", "x", 0o644)}, errdefs.ErrInvalid, "escapes the context root"},
		{"absolute", []ManifestEntry{fileEntry("/etc/x", "x", 0o644)}, errdefs.ErrInvalid, "absolute path"},
		{"symlink out", []ManifestEntry{{Path: "l", Type: EntrySymlink, Target: "../../etc"}}, errdefs.ErrInvalid, "outside the context"},
		{"beneath a symlink", []ManifestEntry{{Path: "l", Type: EntrySymlink, Target: "d"}, {Path: "d", Type: EntryDir, Mode: 0o755}, fileEntry("l/x", "x", 0o644)}, errdefs.ErrInvalid, "through the symlink"},
		{"bad type", []ManifestEntry{{Path: "p", Type: "fifo"}}, errdefs.ErrInvalid, "type \"fifo\""},
		{"bad digest", []ManifestEntry{{Path: "f", Type: EntryFile, Size: 1, Digest: "md5:abc"}}, errdefs.ErrInvalid, "sha256:<64 hex digits>"},
		{"size lies", []ManifestEntry{{Path: "f", Type: EntryFile, Size: 5, Digest: dg("x")}}, errdefs.ErrInvalid, "says 5 bytes"},
		{"hard link to nothing", []ManifestEntry{{Path: "h", Type: EntryHardlink, Target: "nope"}}, errdefs.ErrInvalid, "hard link"},
		{"missing blob", []ManifestEntry{fileEntry("f", "never sent", 0o644)}, errdefs.ErrMissingContent, "does not have the content"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst, _, err := materialize(t, Manifest{Version: ManifestVersion, Entries: c.e}, blobs, Limits{})
			wantError(t, err, dst, c.class, c.want)
			if c.class == errdefs.ErrMissingContent && !errors.Is(err, ErrMissingBlobs) {
				t.Errorf("err %v does not wrap ErrMissingBlobs", err)
			}
		})
	}
	dst, _, err := materialize(t, Manifest{Version: 2}, blobs, Limits{})
	wantError(t, err, dst, errdefs.ErrInvalid, "version 2")
	many := Manifest{Version: ManifestVersion}
	for i := range 5 {
		many.Entries = append(many.Entries, fileEntry(fmt.Sprintf("f%d", i), "x", 0o644))
	}
	dst, _, err = materialize(t, many, blobs, Limits{MaxEntries: 3})
	wantError(t, err, dst, errdefs.ErrTooLarge, "context.max_entries")
	dst, _, err = materialize(t, many, blobs, Limits{MaxUncompressedBytes: 3})
	wantError(t, err, dst, errdefs.ErrTooLarge)
}
