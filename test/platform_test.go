package test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// multiBaseDockerfile builds a busybox base for whichever platform it is
// built for, from that platform's static busybox; its RUN already runs
// the target's busybox, emulated for arm64.
const multiBaseDockerfile = `FROM scratch
ARG TARGETARCH
COPY busybox-${TARGETARCH} /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
`

// multiBase builds base/multi:1, a linux/amd64 + linux/arm64 busybox
// index, and returns its FROM reference.
func (s *server) multiBase() string {
	s.t.Helper()
	b := s.build(s.admin, submission{
		files:  map[string]string{"Dockerfile": multiBaseDockerfile},
		binary: map[string]string{"busybox-amd64": testkit.BusyboxSource, "busybox-arm64": testkit.BusyboxArm64(s.t)},
		fields: [][2]string{{"tags", "base/multi:1"}, {"platform", "linux/amd64,linux/arm64"}},
	})
	mustSucceed(s.t, s, s.admin, b)
	return s.addr + "/base/multi:1"
}

// A two-platform build is one OCI index with an image per platform, each
// built by its own architecture's binaries (arm64 emulated), while a
// FROM --platform=$BUILDPLATFORM stage runs natively and sees the
// target in TARGETPLATFORM: the cross-compile pattern.
func TestMultiPlatformBuild(t *testing.T) {
	s := startServer(t)
	base := s.multiBase()
	tok := s.admin

	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf(`FROM --platform=$BUILDPLATFORM %[1]s AS cross
ARG TARGETPLATFORM BUILDPLATFORM TARGETARCH
RUN echo "$(uname -m) $BUILDPLATFORM $TARGETPLATFORM $TARGETARCH" > /cross

FROM %[1]s
COPY --from=cross /cross /cross
RUN uname -m > /arch
`, base)})
	meta := filepath.Join(t.TempDir(), "meta.json")
	out, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--platform", "linux/amd64,linux/arm64",
		"-t", "plat/app:1", "--metadata-file", meta, dir)
	if code != 0 {
		t.Fatalf("kiln build: exit %d\n%s\n%s", code, out, errOut)
	}
	digest := strings.TrimSpace(out)

	mt, body := s.manifest(tok, "plat/app", digest)
	var idx ociIndex
	if err := json.Unmarshal(body, &idx); err != nil || mt != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("plat/app:1 is %s, want an OCI image index (%v):\n%s", mt, err, body)
	}
	var got []string
	for _, m := range idx.Manifests {
		if m.Platform == nil {
			t.Fatalf("index child %s has no platform:\n%s", m.Digest, body)
		}
		p := m.Platform.OS + "/" + m.Platform.Architecture
		got = append(got, p)
		files := s.imageFiles(tok, "plat/app", m.Digest, "arch", "cross")
		arch := map[string]string{"linux/amd64": "x86_64", "linux/arm64": "aarch64"}[p]
		if files["arch"] != arch+"\n" {
			t.Errorf("%s image: /arch says %q, want %s (RUN ran on the wrong architecture)", p, files["arch"], arch)
		}
		want := fmt.Sprintf("x86_64 linux/amd64 %s %s\n", p, m.Platform.Architecture)
		if files["cross"] != want {
			t.Errorf("%s image: the $BUILDPLATFORM stage wrote %q, want %q (native, told the target)", p, files["cross"], want)
		}
	}
	if !slices.Equal(got, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("index platforms %v, want linux/amd64 and linux/arm64 in that order", got)
	}

	// The build says what it built for, and kiln images show lists both.
	raw, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	var md map[string]any
	json.Unmarshal(raw, &md)
	id, _ := md["kiln.build.id"].(string)
	b := s.get(tok, id)
	if b.Platforms == nil || !slices.Equal(*b.Platforms, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("build %s platforms %v", id, b.Platforms)
	}
	show, errOut, code := s.kilnSplit(tok, nil, "images", "show", "plat/app:1")
	if code != 0 || !strings.Contains(show, "linux/amd64") || !strings.Contains(show, "linux/arm64") {
		t.Errorf("kiln images show: exit %d\n%s\n%s", code, show, errOut)
	}

	// The root filesystem kiln run boots is the host's platform's image.
	if im := s.waitRootFS("plat/app:1"); im.Rootfs.Status != api.RootFSStatusReady {
		t.Errorf("rootfs of the index: %+v", im.Rootfs)
	}

	// An identical submission is answered from this one; the same
	// platforms in another order are another index, built anew.
	again, _, code := s.kilnSplit(tok, nil, "build", "-q", "--platform", "linux/amd64", "--platform", "linux/arm64", dir)
	if code != 0 || strings.TrimSpace(again) != digest {
		t.Errorf("resubmission: exit %d, digest %q, want %s", code, again, digest)
	}
	// -o writes each platform's files into a directory of its own, as
	// buildx does; an image tarball cannot hold an index.
	out2 := filepath.Join(t.TempDir(), "out")
	if _, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--platform", "linux/amd64,linux/arm64", "-o", out2, dir); code != 0 {
		t.Fatalf("-o of a multi-platform build: exit %d\n%s", code, errOut)
	}
	for dir, arch := range map[string]string{"linux_amd64": "x86_64", "linux_arm64": "aarch64"} {
		if b, err := os.ReadFile(filepath.Join(out2, dir, "arch")); err != nil || string(b) != arch+"\n" {
			t.Errorf("-o %s/arch: %q %v, want %s", dir, b, err, arch)
		}
	}
	// type=oci is the whole index, as buildx writes it; type=docker holds
	// one image and is refused.
	ociTar := filepath.Join(t.TempDir(), "x.tar")
	if _, errOut, code := s.kilnSplit(tok, nil, "build", "--platform", "linux/amd64,linux/arm64", "-o", "type=oci,dest="+ociTar, dir); code != 0 {
		t.Fatalf("-o type=oci of two platforms: exit %d\n%s", code, errOut)
	}
	if raw, err := exec.Command("skopeo", "inspect", "--raw", "oci-archive:"+ociTar).Output(); err != nil || sha256Of(string(raw)) != digest {
		t.Errorf("skopeo inspect --raw of the oci output: %v; it is not the index %s:\n%s", err, digest, raw)
	}
	if out, err := exec.Command("skopeo", "inspect", "--override-arch", "arm64", "oci-archive:"+ociTar).CombinedOutput(); err != nil || !strings.Contains(string(out), `"Architecture": "arm64"`) {
		t.Errorf("skopeo inspect of the arm64 image in the oci output: %v\n%s", err, out)
	}
	if _, errOut, code := s.kilnSplit(tok, nil, "build", "--platform", "linux/amd64,linux/arm64", "-o", "type=docker,dest="+filepath.Join(t.TempDir(), "d.tar"), dir); code != 2 || !strings.Contains(errOut, "type=oci") {
		t.Errorf("-o type=docker of two platforms: exit %d\n%s", code, errOut)
	}

	swapped, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--platform", "linux/arm64,linux/amd64", dir)
	if code != 0 || strings.TrimSpace(swapped) == digest {
		t.Errorf("swapped platforms: exit %d, digest %q (first build %s)\n%s", code, swapped, digest, errOut)
	}

	// An arm64-only image converts to no root filesystem, and says why.
	if _, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--platform", "linux/arm64", "-t", "plat/arm:1", dir); code != 0 {
		t.Fatalf("arm64-only build: exit %d\n%s", code, errOut)
	}
	im := s.waitRootFS("plat/arm:1")
	if im.Rootfs.Status != api.RootFSStatusFailed || im.Rootfs.Error == nil || !strings.Contains(*im.Rootfs.Error, "is for linux/arm64, not linux/amd64") {
		t.Errorf("rootfs of an arm64-only image: %+v", im.Rootfs)
	}

	// A platform the host cannot run is refused before anything is queued.
	_, errOut, code = s.kilnSplit(tok, nil, "build", "--platform", "linux/s390x", dir)
	if code != 1 || !strings.Contains(errOut, "linux/s390x") {
		t.Errorf("linux/s390x on a host without its emulator: exit %d\n%s", code, errOut)
	}
}

// imageFiles reads the named files (paths without the leading /) from
// repo@manifest's layers; a later layer's copy wins.
func (s *server) imageFiles(tok, repo, manifest string, names ...string) map[string]string {
	s.t.Helper()
	_, body := s.manifest(tok, repo, manifest)
	var m ociManifest
	if err := json.Unmarshal(body, &m); err != nil {
		s.t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range m.Layers {
		resp := s.registryGet(tok, repo, "blobs/"+l.Digest, "")
		blob, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			s.t.Fatalf("layer %s: %d", l.Digest, resp.StatusCode)
		}
		var r io.Reader = bytes.NewReader(blob)
		if bytes.HasPrefix(blob, []byte{0x1f, 0x8b}) {
			zr, err := gzip.NewReader(r)
			if err != nil {
				s.t.Fatal(err)
			}
			r = zr
		}
		tr := tar.NewReader(r)
		for {
			h, err := tr.Next()
			if err != nil {
				break
			}
			name := strings.TrimPrefix(h.Name, "./")
			if slices.Contains(names, name) && h.Typeflag == tar.TypeReg {
				b, _ := io.ReadAll(tr)
				out[name] = string(b)
			}
		}
	}
	return out
}
