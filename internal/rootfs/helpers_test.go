package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/testkit"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// testRegistry is a real kiln registry served over HTTP; test images are
// pushed through the distribution API like any client would.
type testRegistry struct{ *testkit.KilnRegistry }

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	requireRoot(t)
	return &testRegistry{testkit.StartKilnRegistry(t)}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates device nodes, chowns files and loop-mounts images")
	}
}

// entry is one tar entry of a test layer.
type entry struct {
	hdr  tar.Header
	body string
}

var testTime = time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)

func dirE(name string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
}

func fileE(name, body string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body))}, body: body}
}

func symlinkE(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

func hardlinkE(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}}
}

func nodeE(name string, typ byte, major, minor int64, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: typ, Name: name, Mode: mode, Devmajor: major, Devminor: minor}}
}

func (e entry) owner(uid, gid int) entry { e.hdr.Uid, e.hdr.Gid = uid, gid; return e }

func (e entry) mtime(t time.Time) entry { e.hdr.ModTime = t; return e }

func (e entry) xattr(name, value string) entry {
	if e.hdr.PAXRecords == nil {
		e.hdr.PAXRecords = map[string]string{}
	}
	e.hdr.PAXRecords["SCHILY.xattr."+name] = value
	return e
}

// testLayer is a layer blob ready to push.
type testLayer struct {
	mediaType string
	blob      []byte
	diffID    digest.Digest
}

func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.ModTime.IsZero() {
			h.ModTime = testTime
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %s: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// makeLayer compresses tarball with "gzip", "zstd" or "" (none).
func makeLayer(t testing.TB, compression string, tarball []byte) testLayer {
	t.Helper()
	l := testLayer{diffID: digest.FromBytes(tarball)}
	var buf bytes.Buffer
	switch compression {
	case "gzip":
		zw := gzip.NewWriter(&buf)
		zw.Write(tarball)
		zw.Close()
		l.mediaType = v1.MediaTypeImageLayerGzip
	case "zstd":
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(tarball)
		zw.Close()
		l.mediaType = v1.MediaTypeImageLayerZstd
	case "":
		buf.Write(tarball)
		l.mediaType = v1.MediaTypeImageLayer
	default:
		t.Fatalf("unknown compression %q", compression)
	}
	l.blob = buf.Bytes()
	return l
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pushImage pushes a linux/amd64 (unless arch says otherwise) OCI image
// and returns its manifest digest.
func (r *testRegistry) pushImage(t *testing.T, repo, tag, arch string, cfg v1.ImageConfig, layers ...testLayer) string {
	t.Helper()
	img := v1.Image{Platform: v1.Platform{OS: "linux", Architecture: arch}, Config: cfg, RootFS: v1.RootFS{Type: "layers"}}
	m := v1.Manifest{MediaType: v1.MediaTypeImageManifest}
	m.SchemaVersion = 2
	for _, l := range layers {
		img.RootFS.DiffIDs = append(img.RootFS.DiffIDs, l.diffID)
		m.Layers = append(m.Layers, r.PushBlob(t, repo, l.mediaType, l.blob))
	}
	m.Config = r.PushBlob(t, repo, v1.MediaTypeImageConfig, mustJSON(t, img))
	return r.PushManifest(t, repo, tag, v1.MediaTypeImageManifest, mustJSON(t, m))
}

// mount loop-mounts a filesystem image read-only until the test ends.
func mount(t *testing.T, image string, fstype string) string {
	t.Helper()
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", fstype, "-o", "loop,ro", image, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s image %s: %v\n%s", fstype, image, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	return mnt
}

func requireTool(t *testing.T, f Format) {
	t.Helper()
	if err := CheckTools(f); err != nil {
		t.Fatal(err)
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func digestOf(s string) digest.Digest { return digest.Digest(s) }

// pushIndex pushes an OCI index of repo's images, each given as its
// manifest digest and architecture (linux), in order, and returns its
// digest.
func (r *testRegistry) pushIndex(t *testing.T, repo, tag string, images ...[2]string) string {
	t.Helper()
	idx := v1.Index{MediaType: v1.MediaTypeImageIndex}
	idx.SchemaVersion = 2
	for _, im := range images {
		_, body, _, err := r.Registry.Manifest(context.Background(), repo, im[0])
		if err != nil {
			t.Fatal(err)
		}
		idx.Manifests = append(idx.Manifests, v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: digestOf(im[0]),
			Size: int64(len(body)), Platform: &v1.Platform{OS: "linux", Architecture: im[1]}})
	}
	return r.PushManifest(t, repo, tag, v1.MediaTypeImageIndex, mustJSON(t, idx))
}
