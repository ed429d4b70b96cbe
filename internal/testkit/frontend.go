package testkit

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FrontendPackage is the main package of BuildKit's Dockerfile frontend,
// the program the docker/dockerfile images run.
const FrontendPackage = "github.com/moby/buildkit/frontend/dockerfile/cmd/dockerfile-frontend"

// FrontendBinaryPath is where the frontend binary sits inside the image.
const FrontendBinaryPath = "/bin/dockerfile-frontend"

// Labels of the official docker/dockerfile image (BuildKit's
// frontend/dockerfile/cmd/dockerfile-frontend/Dockerfile). BuildKit's
// gateway reads both: network.none runs the frontend without network,
// caps lists what it supports beyond the basics.
const (
	frontendNetworkNoneLabel = "moby.buildkit.frontend.network.none"
	frontendCapsLabel        = "moby.buildkit.frontend.caps"
	frontendCaps             = "moby.buildkit.frontend.inputs,moby.buildkit.frontend.subrequests,moby.buildkit.frontend.contexts,moby.buildkit.frontend.gitquerystring,moby.buildkit.frontend.contexts.zstd"
)

// Frontend is BuildKit's Dockerfile frontend, built from the BuildKit
// module go.mod pins, packaged like the docker/dockerfile image: one gzip
// layer holding /bin/dockerfile-frontend, a config with that entrypoint and
// the official image's labels. It is built for linux/GOARCH as a single
// manifest (no index). The bytes are deterministic: the same binary gives
// the same digest in every process.
type Frontend struct {
	// Binary is the static frontend executable on the host.
	Binary string
	// BuildKitVersion is the version of github.com/moby/buildkit it was
	// built from ("v0.34.2"); empty for a KILN_DOCKERFILE_FRONTEND binary.
	BuildKitVersion string
	// LayoutDir is an OCI image layout (oci-layout, index.json,
	// blobs/sha256/…) of the image; index.json names it FrontendTag.
	LayoutDir string
	// Digest is the manifest digest, "sha256:…".
	Digest string

	Manifest []byte
	Config   []byte
	Layer    []byte // gzip-compressed tar

	ConfigDesc ocispec.Descriptor
	LayerDesc  ocispec.Descriptor

	diffID digest.Digest
}

// FrontendVariantLabel is the config label Variant sets.
const FrontendVariantLabel = "dev.kiln.testkit.variant"

// Variant returns a copy of f whose config carries the label
// FrontendVariantLabel=name: the same layer, but its own config and
// manifest digests. Tests use it for a second "version" of the frontend,
// or for an image no earlier test has pulled into buildkitd's content
// store (BuildKit answers a digest-pinned image it already holds without
// asking the registry, auth included). Its LayoutDir is empty.
func (f *Frontend) Variant(t testing.TB, name string) *Frontend {
	t.Helper()
	v := *f
	v.LayoutDir = ""
	if err := v.packConfig(map[string]string{FrontendVariantLabel: name}); err != nil {
		t.Fatalf("frontend variant %q: %v", name, err)
	}
	return &v
}

// FrontendTag is the tag the layout's index.json gives the image, after the
// docker/dockerfile:1 channel whose role it plays in tests.
const FrontendTag = "1"

var (
	frontendOnce sync.Once
	frontendImg  *Frontend
	frontendErr  error
)

// FrontendImage returns the Dockerfile frontend image, building the binary
// and the image the first time a process asks. Set KILN_DOCKERFILE_FRONTEND
// to a prebuilt static frontend binary to skip the go build.
//
// The binary and layout live in a directory shared by every test process
// of this source tree (FrontendDir); the first call of each process runs
// `go build`, which costs well under a second once the Go build cache
// holds BuildKit (bin/buildkitd compiles the same packages with the same
// flags), so a go.mod bump is never served a stale frontend.
func FrontendImage(t testing.TB) *Frontend {
	t.Helper()
	f, err := LoadFrontendImage()
	if err != nil {
		t.Fatalf("dockerfile frontend image: %v", err)
	}
	return f
}

// LoadFrontendImage is FrontendImage for code without a testing.TB
// (TestMain).
func LoadFrontendImage() (*Frontend, error) {
	frontendOnce.Do(func() { frontendImg, frontendErr = buildFrontendImage() })
	return frontendImg, frontendErr
}

// FrontendDir is the directory the test processes of this source tree
// share for the frontend binary and image layout, keyed by the tree's path
// (like BuilderImageDir).
func FrontendDir() string {
	root, _ := RepoRoot()
	sum := sha256.Sum256([]byte(root))
	return filepath.Join(os.TempDir(), "kiln-test-frontend-"+hex.EncodeToString(sum[:6]))
}

func buildFrontendImage() (*Frontend, error) {
	dir := FrontendDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// Test binaries of several packages run in parallel: one builds and
	// writes the layout while the others wait.
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open frontend build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	f := &Frontend{}
	if p := os.Getenv("KILN_DOCKERFILE_FRONTEND"); p != "" {
		if err := checkExecutable(p); err != nil {
			return nil, fmt.Errorf("KILN_DOCKERFILE_FRONTEND=%s: %w", p, err)
		}
		f.Binary = p
	} else {
		f.Binary = filepath.Join(dir, "dockerfile-frontend")
		if f.BuildKitVersion, err = goBuildFrontend(f.Binary); err != nil {
			return nil, err
		}
	}
	bin, err := os.ReadFile(f.Binary)
	if err != nil {
		return nil, err
	}
	if err := f.pack(bin); err != nil {
		return nil, err
	}
	f.LayoutDir = filepath.Join(dir, "oci-"+strings.TrimPrefix(f.Digest, "sha256:")[:16])
	if err := f.writeLayout(); err != nil {
		return nil, err
	}
	return f, nil
}

// goBuildFrontend builds FrontendPackage into out: static (CGO off), with
// exactly the flags bin/buildkitd is built with (Makefile) so the two share
// their compile in the Go build cache. It returns the BuildKit version.
func goBuildFrontend(out string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	env := append(os.Environ(), "GOFLAGS=-mod=mod", "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)

	list := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "github.com/moby/buildkit")
	list.Dir, list.Env = root, env
	v, err := list.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m github.com/moby/buildkit: %w", err)
	}
	version := strings.TrimSpace(string(v))

	tmp := fmt.Sprintf("%s.tmp-%d", out, os.Getpid())
	ldflags := []string{"-s", "-w", "-buildid=",
		"-X", "main.Version=" + version,
		"-X", "main.Revision=kiln-testkit",
	}
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags="+strings.Join(ldflags, " "), "-o", tmp, FrontendPackage)
	cmd.Dir, cmd.Env = root, env
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build %s (set KILN_DOCKERFILE_FRONTEND to use a prebuilt one): %w\n%s", FrontendPackage, err, buf.String())
	}
	if err := os.Rename(tmp, out); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("install frontend binary: %w", err)
	}
	return version, nil
}

// pack builds the layer, config and manifest around bin.
func (f *Frontend) pack(bin []byte) error {
	// Fixed metadata keeps the digest a function of the binary alone.
	epoch := time.Unix(0, 0).UTC()
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	dirName, fileName := strings.TrimPrefix(filepath.Dir(FrontendBinaryPath), "/")+"/", strings.TrimPrefix(FrontendBinaryPath, "/")
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dirName, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fileName, Mode: 0o755, Size: int64(len(bin)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	if _, err := tw.Write(bin); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	diffID := digest.FromBytes(tarBuf.Bytes())

	var gzBuf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gzBuf, gzip.BestSpeed)
	if _, err := io.Copy(zw, &tarBuf); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	f.Layer = gzBuf.Bytes()
	f.LayerDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(f.Layer), Size: int64(len(f.Layer))}
	f.diffID = diffID
	return f.packConfig(nil)
}

// packConfig writes the config (with extra labels) and the manifest.
func (f *Frontend) packConfig(extraLabels map[string]string) error {
	epoch := time.Unix(0, 0).UTC()
	labels := map[string]string{
		frontendNetworkNoneLabel: "true",
		frontendCapsLabel:        frontendCaps,
	}
	for k, v := range extraLabels {
		labels[k] = v
	}
	cfg := ocispec.Image{
		Created:  &epoch,
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		Config: ocispec.ImageConfig{
			// What BuildKit gives a FROM scratch image.
			Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Entrypoint: []string{FrontendBinaryPath},
			Labels:     labels,
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{f.diffID}},
		History: []ocispec.History{{
			Created:   &epoch,
			CreatedBy: "kiln testkit: COPY dockerfile-frontend " + FrontendBinaryPath,
		}},
	}
	var err error
	if f.Config, err = json.Marshal(cfg); err != nil {
		return err
	}
	f.ConfigDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(f.Config), Size: int64(len(f.Config))}

	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    f.ConfigDesc,
		Layers:    []ocispec.Descriptor{f.LayerDesc},
	}
	if f.Manifest, err = json.Marshal(m); err != nil {
		return err
	}
	f.Digest = digest.FromBytes(f.Manifest).String()
	return nil
}

// ManifestDesc describes the image's manifest.
func (f *Frontend) ManifestDesc() ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageManifest,
		Digest:    digest.Digest(f.Digest),
		Size:      int64(len(f.Manifest)),
		Platform:  &ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
	}
}

// writeLayout writes the OCI layout unless a complete one for this digest
// is already there (the directory name carries the digest; it is renamed
// into place only once complete).
func (f *Frontend) writeLayout() error {
	if _, err := os.Stat(filepath.Join(f.LayoutDir, "index.json")); err == nil {
		return nil
	}
	tmp := fmt.Sprintf("%s.tmp-%d", f.LayoutDir, os.Getpid())
	os.RemoveAll(tmp)
	blobs := filepath.Join(tmp, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	desc := f.ManifestDesc()
	desc.Annotations = map[string]string{ocispec.AnnotationRefName: FrontendTag}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{desc},
	})
	if err != nil {
		return err
	}
	files := map[string][]byte{
		filepath.Join(tmp, ocispec.ImageLayoutFile):                   []byte(`{"imageLayoutVersion":"` + ocispec.ImageLayoutVersion + `"}`),
		filepath.Join(tmp, "index.json"):                              index,
		filepath.Join(blobs, strings.TrimPrefix(f.Digest, "sha256:")): f.Manifest,
		filepath.Join(blobs, f.ConfigDesc.Digest.Encoded()):           f.Config,
		filepath.Join(blobs, f.LayerDesc.Digest.Encoded()):            f.Layer,
	}
	for p, data := range files {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			os.RemoveAll(tmp)
			return err
		}
	}
	if err := os.Rename(tmp, f.LayoutDir); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("install frontend image layout: %w", err)
	}
	return nil
}

// ImagePusher uploads blobs and manifests to a registry; PlainRegistry and
// *KilnRegistry (token auth) have these methods.
type ImagePusher interface {
	PushBlob(t testing.TB, repo, mediaType string, data []byte) ocispec.Descriptor
	PushManifest(t testing.TB, repo, tag, mediaType string, body []byte) string
}

// Push uploads the image to r as repo:tag and returns the manifest digest.
func (f *Frontend) Push(t testing.TB, r ImagePusher, repo, tag string) string {
	t.Helper()
	r.PushBlob(t, repo, f.LayerDesc.MediaType, f.Layer)
	r.PushBlob(t, repo, f.ConfigDesc.MediaType, f.Config)
	got := r.PushManifest(t, repo, tag, ocispec.MediaTypeImageManifest, f.Manifest)
	if got != f.Digest {
		t.Fatalf("pushed frontend manifest has digest %s, want %s", got, f.Digest)
	}
	return f.Digest
}

// PushFrontendImage pushes the frontend image to the plain-HTTP registry at
// host (host:port, e.g. from Registry) as repo:tag and returns the
// digest-pinned reference host/repo@sha256:…, the form BUILDKIT_SYNTAX
// takes.
func PushFrontendImage(t testing.TB, host, repo, tag string) string {
	t.Helper()
	dgst := FrontendImage(t).Push(t, PlainRegistry{Host: host}, repo, tag)
	return host + "/" + repo + "@" + dgst
}

// PlainRegistry is a registry at Host (host:port) spoken to over plain HTTP,
// like the ones Registry and RegistryWithAuth start; Username and Password,
// when set, are sent as basic auth.
type PlainRegistry struct {
	Host     string
	Username string
	Password string
}

var _ ImagePusher = PlainRegistry{}

func (r PlainRegistry) do(t testing.TB, method, u, contentType string, body []byte, want int) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if r.Username != "" {
		req.SetBasicAuth(r.Username, r.Password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if want != 0 && resp.StatusCode != want {
		t.Fatalf("%s %s: status %d, want %d: %s", method, u, resp.StatusCode, want, bytes.TrimSpace(msg))
	}
	return resp
}

// PushBlob uploads data to repo unless the registry already has it, and
// returns its descriptor.
func (r PlainRegistry) PushBlob(t testing.TB, repo, mediaType string, data []byte) ocispec.Descriptor {
	t.Helper()
	d := digest.FromBytes(data)
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
	base := "http://" + r.Host + "/v2/" + repo
	if r.do(t, http.MethodHead, base+"/blobs/"+d.String(), "", nil, 0).StatusCode == http.StatusOK {
		return desc
	}
	resp := r.do(t, http.MethodPost, base+"/blobs/uploads/", "", nil, http.StatusAccepted)
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("http://" + r.Host + "/")
	u = u.ResolveReference(loc)
	q := u.Query()
	q.Set("digest", d.String())
	u.RawQuery = q.Encode()
	r.do(t, http.MethodPut, u.String(), "application/octet-stream", data, http.StatusCreated)
	return desc
}

// PushManifest stores body as repo:tag and returns its digest.
func (r PlainRegistry) PushManifest(t testing.TB, repo, tag, mediaType string, body []byte) string {
	t.Helper()
	r.do(t, http.MethodPut, "http://"+r.Host+"/v2/"+repo+"/manifests/"+tag, mediaType, body, http.StatusCreated)
	return digest.FromBytes(body).String()
}
