package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
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
