package vm

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// TestTwoPlatformBuildRunsArm64StepsUnderEmulation builds one Dockerfile
// for linux/amd64 and linux/arm64 in one builder VM: the arm64 RUN step
// runs a static arm64 busybox through the image's qemu-aarch64, registered
// by /init with binfmt_misc's fix-binary flag (the step's root is FROM
// scratch: no emulator in it). The push is an image index with one
// manifest per platform, and each platform's layer records the machine
// its step ran as.
func TestTwoPlatformBuildRunsArm64StepsUnderEmulation(t *testing.T) {
	r := newRuntime(t)
	platforms := []string{"linux/amd64", "linux/arm64"}
	if err := r.CheckPlatforms(platforms); err != nil {
		t.Fatalf("CheckPlatforms(%v): %v", platforms, err)
	}
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": `FROM scratch
ARG TARGETARCH
COPY busybox-$TARGETARCH /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox uname -m > /arch"]
`})
	for arch, src := range map[string]string{"amd64": testkit.BusyboxSource, "arm64": testkit.BusyboxArm64(t)} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "busybox-"+arch), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	ref := guestRegistry + "/app/multi:latest"
	start := time.Now()
	res, err := r.Run(ctx(t, 10*time.Minute), job("multi", vol, 1024, solve.Request{
		ContextDir: dir,
		Platforms:  platforms,
		Push:       []string{ref},
	}), rec)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("two-platform build: %v", err)
	}
	t.Logf("two-platform build in %s: %s", took.Round(time.Millisecond), breakdown(rec, took))
	assertReleased(t, r, vol)

	idx, idxDigest := fetchIndex(t, onHost(ref))
	if res.Digest != "" && res.Digest != idxDigest {
		t.Errorf("build reported digest %s, the registry's index is %s", res.Digest, idxDigest)
	}
	found := map[string]bool{}
	for _, d := range idx.Manifests {
		if d.Platform == nil || d.Platform.OS != "linux" {
			continue // an attestation manifest (unknown/unknown)
		}
		arch := d.Platform.Architecture
		found[arch] = true
		img := testkit.FetchImage(t, onHost(guestRegistry+"/app/multi@"+d.Digest.String()))
		if img.Config.OS != "linux" || img.Config.Architecture != arch {
			t.Errorf("index entry linux/%s points at an image whose config says %s/%s", arch, img.Config.OS, img.Config.Architecture)
		}
		want := map[string]string{"amd64": "x86_64", "arm64": "aarch64"}[arch]
		if got := strings.TrimSpace(string(img.Files["/arch"])); got != want {
			t.Errorf("linux/%s: the RUN step saw machine %q, want %q", arch, got, want)
		}
	}
	var got []string
	for a := range found {
		got = append(got, a)
	}
	slices.Sort(got)
	if strings.Join(got, ",") != "amd64,arm64" {
		t.Fatalf("index %s has platforms %v, want linux/amd64 and linux/arm64", idxDigest, got)
	}
}

// fetchIndex reads the image index ref names from the test registry.
func fetchIndex(t *testing.T, ref string) (ocispec.Index, string) {
	t.Helper()
	host, rest, _ := strings.Cut(ref, "/")
	repo, tag, _ := strings.Cut(rest, ":")
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, tag), nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageIndex+",application/vnd.docker.distribution.manifest.list.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("fetch index %s: %v", ref, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("fetch index %s: %s %v: %s", ref, resp.Status, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.Contains(ct, "index") && !strings.Contains(ct, "manifest.list") {
		t.Fatalf("%s is a %s, want an image index", ref, ct)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil {
		t.Fatalf("decode index %s: %v", ref, err)
	}
	return idx, resp.Header.Get("Docker-Content-Digest")
}
