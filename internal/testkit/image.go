package testkit

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"runtime"
	"strings"
	"testing"

	"github.com/distribution/reference"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Image is an image as a registry serves it, with its layers flattened.
type Image struct {
	// Digest of the manifest the reference resolved to (for an index, the
	// index's digest).
	Digest string
	Config ocispec.Image
	// Annotations are the image manifest's.
	Annotations map[string]string
	// Files maps absolute paths of regular files to their content.
	Files map[string][]byte
	// Symlinks maps absolute paths of symlinks to their targets.
	Symlinks map[string]string
	// Layers holds each layer's uncompressed tar, including content that a
	// later layer deleted.
	Layers [][]byte
}

const manifestAccept = ocispec.MediaTypeImageManifest + "," + ocispec.MediaTypeImageIndex + "," +
	"application/vnd.docker.distribution.manifest.v2+json," +
	"application/vnd.docker.distribution.manifest.list.v2+json"

// FetchImage pulls ref (host/repo:tag or host/repo@sha256:…) over plain HTTP
// and flattens its layers, so tests can check what a build really pushed.
func FetchImage(t testing.TB, ref string) Image {
	t.Helper()
	img, err := fetchImage(ref)
	if err != nil {
		t.Fatalf("fetch image %s: %v", ref, err)
	}
	return img
}

// ManifestExists reports whether the registry serves a manifest for ref.
func ManifestExists(t testing.TB, ref string) bool {
	t.Helper()
	host, repo, tagOrDigest, err := splitRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodHead, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, tagOrDigest), nil)
	req.Header.Set("Accept", manifestAccept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("HEAD manifest %s: %v", ref, err)
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func splitRef(ref string) (host, repo, tagOrDigest string, err error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "", "", "", fmt.Errorf("parse reference %q: %w", ref, err)
	}
	host, repo = reference.Domain(named), reference.Path(named)
	switch r := named.(type) {
	case reference.Digested:
		return host, repo, r.Digest().String(), nil
	case reference.Tagged:
		return host, repo, r.Tag(), nil
	}
	return host, repo, "latest", nil
}

func fetchImage(ref string) (Image, error) {
	host, repo, tagOrDigest, err := splitRef(ref)
	if err != nil {
		return Image{}, err
	}
	base := fmt.Sprintf("http://%s/v2/%s", host, repo)

	body, mediaType, dgst, err := get(base+"/manifests/"+tagOrDigest, manifestAccept)
	if err != nil {
		return Image{}, err
	}
	img := Image{Digest: dgst, Files: map[string][]byte{}, Symlinks: map[string]string{}}

	if strings.Contains(mediaType, "index") || strings.Contains(mediaType, "manifest.list") {
		var idx ocispec.Index
		if err := json.Unmarshal(body, &idx); err != nil {
			return Image{}, fmt.Errorf("decode index: %w", err)
		}
		var chosen *ocispec.Descriptor
		for i, m := range idx.Manifests {
			if m.Platform != nil && m.Platform.OS == "linux" && m.Platform.Architecture == runtime.GOARCH {
				chosen = &idx.Manifests[i]
				break
			}
		}
		if chosen == nil {
			return Image{}, fmt.Errorf("index has no linux/%s manifest", runtime.GOARCH)
		}
		if body, _, _, err = get(base+"/manifests/"+chosen.Digest.String(), manifestAccept); err != nil {
			return Image{}, err
		}
	}

	var m ocispec.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		return Image{}, fmt.Errorf("decode manifest: %w", err)
	}
	img.Annotations = m.Annotations
	cfg, _, _, err := get(base+"/blobs/"+m.Config.Digest.String(), "*/*")
	if err != nil {
		return Image{}, fmt.Errorf("config blob: %w", err)
	}
	if err := json.Unmarshal(cfg, &img.Config); err != nil {
		return Image{}, fmt.Errorf("decode config: %w", err)
	}
	for _, l := range m.Layers {
		blob, _, _, err := get(base+"/blobs/"+l.Digest.String(), "*/*")
		if err != nil {
			return Image{}, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		if err := applyLayer(&img, blob, l.MediaType); err != nil {
			return Image{}, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
	}
	return img, nil
}

func get(url, accept string) (body []byte, mediaType, dgst string, err error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, "", "", err
	}
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, "", "", err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		return nil, "", "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, "", "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body))
	}
	dgst = resp.Header.Get("Docker-Content-Digest")
	if dgst == "" {
		dgst = digest.FromBytes(body).String()
	}
	return body, resp.Header.Get("Content-Type"), dgst, nil
}

func applyLayer(img *Image, blob []byte, mediaType string) error {
	var r io.Reader = bytes.NewReader(blob)
	switch {
	case strings.HasSuffix(mediaType, "gzip"):
		zr, err := gzip.NewReader(r)
		if err != nil {
			return err
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(mediaType, "zstd"):
		zr, err := zstd.NewReader(r)
		if err != nil {
			return err
		}
		defer zr.Close()
		r = zr
	}
	raw, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	img.Layers = append(img.Layers, raw)
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := path.Clean("/" + h.Name)
		dir, base := path.Split(name)
		if base == ".wh..wh..opq" {
			removeUnder(img, path.Clean(dir))
			continue
		}
		if strings.HasPrefix(base, ".wh.") {
			target := path.Join(dir, strings.TrimPrefix(base, ".wh."))
			delete(img.Files, target)
			delete(img.Symlinks, target)
			removeUnder(img, target)
			continue
		}
		switch h.Typeflag {
		case tar.TypeReg:
			data, err := io.ReadAll(tr)
			if err != nil {
				return err
			}
			delete(img.Symlinks, name)
			img.Files[name] = data
		case tar.TypeSymlink:
			delete(img.Files, name)
			img.Symlinks[name] = h.Linkname
		case tar.TypeLink:
			target := path.Clean("/" + h.Linkname)
			if data, ok := img.Files[target]; ok {
				img.Files[name] = data
			}
		}
	}
}

func removeUnder(img *Image, dir string) {
	prefix := strings.TrimSuffix(dir, "/") + "/"
	for p := range img.Files {
		if strings.HasPrefix(p, prefix) {
			delete(img.Files, p)
		}
	}
	for p := range img.Symlinks {
		if strings.HasPrefix(p, prefix) {
			delete(img.Symlinks, p)
		}
	}
}

// ContainsBytes reports whether any layer (deleted files included) or the
// config of img contains needle; tests use it to prove a secret did not leak
// into an image.
func (img Image) ContainsBytes(needle []byte) bool {
	for _, layer := range img.Layers {
		if bytes.Contains(layer, needle) {
			return true
		}
	}
	cfg, _ := json.Marshal(img.Config)
	return bytes.Contains(cfg, needle)
}

// FileDigest is the sha256 digest ("sha256:<hex>") of the file at p.
func FileDigest(t testing.TB, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := digest.SHA256.FromReader(f)
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}
