package runner_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/testkit"
)

// builderImage is the builder image of this source tree, shared by all
// its test binaries.
func builderImage(t *testing.T) builderimage.Manifest {
	t.Helper()
	requireQEMU(t)
	return testkit.BuilderImage(t)
}

func requireQEMU(t *testing.T) {
	t.Helper()
	_, qerr := exec.LookPath("qemu-system-x86_64")
	_, kerr := os.Stat("/dev/kvm")
	if qerr != nil && kerr != nil {
		t.Skip("needs qemu-system-x86_64 (apt-get install -y qemu-system-x86); this host has neither QEMU nor /dev/kvm")
	}
	if qerr != nil {
		t.Fatalf("qemu-system-x86_64 is missing: %v; install it with `apt-get install -y qemu-system-x86`", qerr)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: converting an image creates device nodes and chowns files")
	}
}

// testRegistry is a real kiln registry served over HTTP; the test image is
// pushed through the distribution API like any client would.
type testRegistry struct{ *testkit.KilnRegistry }

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	return &testRegistry{testkit.StartKilnRegistry(t)}
}

// pushImage pushes a one-layer linux/amd64 OCI image (the layer gzipped)
// and returns its manifest digest.
func (r *testRegistry) pushImage(t *testing.T, repo, tag string, cfg v1.ImageConfig, layerTar []byte) string {
	t.Helper()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(layerTar)
	zw.Close()
	img := v1.Image{
		Platform: v1.Platform{OS: "linux", Architecture: "amd64"},
		Config:   cfg,
		RootFS:   v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(layerTar)}},
	}
	m := v1.Manifest{MediaType: v1.MediaTypeImageManifest}
	m.SchemaVersion = 2
	m.Layers = []v1.Descriptor{r.PushBlob(t, repo, v1.MediaTypeImageLayerGzip, gz.Bytes())}
	m.Config = r.PushBlob(t, repo, v1.MediaTypeImageConfig, mustJSON(t, img))
	body := mustJSON(t, m)
	r.Do(t, repo, http.MethodPut, r.URL+"/v2/"+repo+"/manifests/"+tag, v1.MediaTypeImageManifest, body, http.StatusCreated)
	return digest.FromBytes(body).String()
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// busyboxApplets are linked to /bin/busybox in the test image.
var busyboxApplets = []string{"sh", "id", "sleep", "cat", "ls", "rm", "mkdir", "touch", "hostname", "env"}

// busyboxLayer is a layer tar holding Debian's static busybox with its
// applet links, an /etc/passwd and /etc/group with a non-root user "app"
// (uid 1000) who is also in group "extra" (2000), app's home, a marker
// file, and a /tmp.
func busyboxLayer(t *testing.T) []byte {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("read /bin/busybox: %v; install it with `apt-get install -y busybox-static`", err)
	}
	if out, err := exec.Command("file", "-L", "/bin/busybox").Output(); err == nil && !bytes.Contains(out, []byte("statically linked")) {
		t.Fatalf("/bin/busybox is not static (%s); install busybox-static", bytes.TrimSpace(out))
	}
	now := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h tar.Header, body []byte) {
		h.ModTime = now
		h.Format = tar.FormatPAX
		h.Size = int64(len(body))
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar %s: %v", h.Name, err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	dir := func(name string, mode int64, uid int) {
		add(tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: uid}, nil)
	}
	file := func(name, body string, mode int64) {
		add(tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, []byte(body))
	}
	dir("bin/", 0o755, 0)
	add(tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755}, bb)
	for _, a := range busyboxApplets {
		add(tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}, nil)
	}
	dir("etc/", 0o755, 0)
	file("etc/passwd", strings.Join([]string{
		"root:x:0:0:root:/root:/bin/sh",
		"app:x:1000:1000:App:/home/app:/bin/sh",
	}, "\n")+"\n", 0o644)
	file("etc/group", strings.Join([]string{
		"root:x:0:",
		"app:x:1000:",
		"extra:x:2000:someone,app",
	}, "\n")+"\n", 0o644)
	file("etc/marker", "original\n", 0o644)
	dir("home/", 0o755, 0)
	dir("home/app/", 0o755, 1000)
	dir("root/", 0o700, 0)
	dir("tmp/", 0o1777, 0)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// testImage pushes the busybox image with cfg into a real registry and
// converts it to erofs, as kiln does for every built image.
func testImage(t *testing.T, cfg v1.ImageConfig) rootfs.Artifact {
	t.Helper()
	reg := startRegistry(t)
	dgst := reg.pushImage(t, "test/busybox", "latest", cfg, busyboxLayer(t))
	if err := rootfs.CheckTools(rootfs.FormatErofs); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := rootfs.Convert(ctx, reg.Registry, dgst, filepath.Join(t.TempDir(), "img"), rootfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return res.Artifact
}

// mountErofs loop-mounts a filesystem image read-only until the test ends.
func mountErofs(t *testing.T, image string) string {
	t.Helper()
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "erofs", "-o", "loop,ro", image, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount erofs image %s: %v\n%s", image, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	return mnt
}

// qemuFor lists the PIDs of QEMU processes whose command line mentions s.
func qemuFor(s string) []string {
	var pids []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte("qemu-system")) && bytes.Contains(b, []byte(s)) {
			pids = append(pids, filepath.Base(d))
		}
	}
	return pids
}

// output collects what the process writes and notes when it first wrote
// and when a given text first appeared.
type output struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	first time.Time
	want  string
	seen  chan struct{}
}

func newOutput(want string) *output { return &output{want: want, seen: make(chan struct{})} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.first.IsZero() {
		o.first = time.Now()
	}
	o.buf.Write(p)
	if o.want != "" && strings.Contains(o.buf.String(), o.want) {
		o.want = ""
		close(o.seen)
	}
	return len(p), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

func (o *output) firstWrite() time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.first
}

// consoleWriter streams the VM console to stderr when KILN_TEST_CONSOLE=1.
func consoleWriter() io.Writer {
	if os.Getenv("KILN_TEST_CONSOLE") == "1" {
		return os.Stderr
	}
	return nil
}
