package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// ExportTar writes the same flattened tree a conversion builds: layers
// applied with their whiteouts, and modes, owners, devices, fifos, hard
// links and xattrs carried into the tar.
func TestExportTarCarriesTheAppliedTree(t *testing.T) {
	requireRoot(t)
	r := startRegistry(t)
	hostFile := filepath.Join(t.TempDir(), "host-secret")
	if err := os.WriteFile(hostFile, []byte("host"), 0o600); err != nil {
		t.Fatal(err)
	}
	dgst := specImage(t, r, "spec/export", hostFile)
	s, err := Open(t.TempDir(), r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := s.ExportTar(context.Background(), dgst, "", &buf); err != nil {
		t.Fatal(err)
	}
	entries := map[string]*tar.Header{}
	content := map[string]string{}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		entries[h.Name] = h
		b, _ := io.ReadAll(tr)
		content[h.Name] = string(b)
	}
	for _, gone := range []string{"etc/removeme", "gone/a", "opq/old1", "opq2/old", "etc/.wh.removeme", "opq/.wh..wh..opq"} {
		if _, ok := entries[gone]; ok {
			t.Errorf("%s is in the export; a whiteout removed it", gone)
		}
	}
	want := map[string]string{"bin/tool": "tool v2", "opq/new": "new", "opq2/early": "early", "victim": "image content", "gone/fresh": "fresh"}
	for name, body := range want {
		if content[name] != body {
			t.Errorf("%s = %q, want %q", name, content[name], body)
		}
	}
	check := func(name string, ok func(*tar.Header) bool, what string) {
		t.Helper()
		if h := entries[name]; h == nil || !ok(h) {
			t.Errorf("%s: want %s, got %+v", name, what, h)
		}
	}
	check("bin/tool", func(h *tar.Header) bool { return h.Mode&0o4000 != 0 }, "setuid")
	check("bin/ping", func(h *tar.Header) bool { return h.PAXRecords["SCHILY.xattr.security.capability"] == capNetRaw }, "its capability xattr")
	check("etc/hostname", func(h *tar.Header) bool { return h.PAXRecords["SCHILY.xattr.user.kiln"] == "hello" }, "its user xattr")
	check("home/user/notes", func(h *tar.Header) bool { return h.Uid == 1000 && h.Gid == 1001 && h.Mode == 0o640 }, "1000:1001 0640")
	check("dev/null", func(h *tar.Header) bool { return h.Typeflag == tar.TypeChar && h.Devmajor == 1 && h.Devminor == 3 }, "char 1:3")
	check("dev/loop0", func(h *tar.Header) bool { return h.Typeflag == tar.TypeBlock && h.Devmajor == 7 }, "block 7:0")
	check("run.fifo", func(h *tar.Header) bool { return h.Typeflag == tar.TypeFifo }, "a fifo")
	check("lib", func(h *tar.Header) bool { return h.Typeflag == tar.TypeSymlink && h.Linkname == "usr/lib" }, "symlink to usr/lib")
	check("tmp/", func(h *tar.Header) bool { return h.Typeflag == tar.TypeDir && h.Mode == 0o1777 }, "sticky dir")
	libs := []*tar.Header{entries["usr/lib/libfoo.so"], entries["usr/lib/libfoo.so.1"]}
	if libs[0] == nil || libs[1] == nil || (libs[0].Typeflag != tar.TypeLink && libs[1].Typeflag != tar.TypeLink) {
		t.Errorf("usr/lib/libfoo.so and .so.1 are not one hard-linked file in the export: %+v %+v", libs[0], libs[1])
	}
	if left, _ := filepath.Glob(filepath.Join(s.dir, "by-digest", ".export-*")); len(left) > 0 {
		t.Errorf("export left its staging behind: %v", left)
	}
}

// An index exports whole, every manifest and blob once, under an
// index.json naming it; ExportTar and ExportOCI pick the platform asked
// for from it.
func TestExportOfAnIndex(t *testing.T) {
	r := startRegistry(t)
	repo := "multi/export"
	shared := makeLayer(t, "gzip", tarOf(t, fileE("shared", "both", 0o644)))
	amd := r.pushImage(t, repo, "amd", "amd64", v1.ImageConfig{}, shared, makeLayer(t, "gzip", tarOf(t, fileE("arch", "amd64", 0o644))))
	arm := r.pushImage(t, repo, "arm", "arm64", v1.ImageConfig{}, shared, makeLayer(t, "gzip", tarOf(t, fileE("arch", "arm64", 0o644))))
	index := r.pushIndex(t, repo, "multi", [2]string{amd, "amd64"}, [2]string{arm, "arm64"})
	s, err := Open(t.TempDir(), r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	var buf bytes.Buffer
	if err := s.ExportOCIIndex(ctx, index, "kiln.test/multi/export:1", &buf); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := files[h.Name]; dup {
			t.Errorf("%s is in the layout twice", h.Name)
		}
		files[h.Name], _ = io.ReadAll(tr)
	}
	var top v1.Index
	if err := json.Unmarshal(files["index.json"], &top); err != nil || len(top.Manifests) != 1 || top.Manifests[0].Digest.String() != index ||
		top.Manifests[0].MediaType != v1.MediaTypeImageIndex || top.Manifests[0].Annotations[v1.AnnotationRefName] != "kiln.test/multi/export:1" {
		t.Fatalf("index.json (%v): %s", err, files["index.json"])
	}
	for _, d := range []string{index, amd, arm} {
		if b, ok := files["blobs/sha256/"+digestOf(d).Encoded()]; !ok || digest.FromBytes(b).String() != d {
			t.Errorf("manifest %s is missing or damaged in the layout", d)
		}
	}
	blobs := 0
	for name := range files {
		if strings.HasPrefix(name, "blobs/sha256/") && name != "blobs/sha256/" {
			blobs++
		}
	}
	// 3 manifests, 2 configs, 3 distinct layers (one shared).
	if blobs != 8 {
		t.Errorf("layout holds %d blobs, want 8", blobs)
	}
	if _, ok := files["manifest.json"]; ok {
		t.Error("a Docker manifest.json cannot describe an index, but the layout has one")
	}
	if err := s.ExportOCIIndex(ctx, amd, "", io.Discard); err == nil {
		t.Error("an image manifest exported as an index")
	}

	for arch, want := range map[string]string{"amd64": amd, "arm64": arm} {
		buf.Reset()
		if err := s.ExportOCI(ctx, index, "", "linux/"+arch, &buf); err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(buf.Bytes(), []byte(digestOf(want).Encoded())) {
			t.Errorf("ExportOCI for linux/%s does not hold its manifest %s", arch, want)
		}
	}
	if err := s.ExportOCI(ctx, index, "", "linux/s390x", io.Discard); err == nil || !strings.Contains(err.Error(), "linux/amd64, linux/arm64") {
		t.Errorf("an export for a platform the index lacks: %v", err)
	}
}
