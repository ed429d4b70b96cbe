package registry

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// testImage is an OCI image layout written by hand: one gzip layer, a
// config, an image manifest tagged "v1" and an image index tagged "multi"
// that points at the manifest.
type testImage struct {
	dir          string
	layer        digest.Digest
	manifest     digest.Digest
	manifestBody []byte
	index        digest.Digest
	indexBody    []byte
}

func writeTestImage(t *testing.T, content string) testImage {
	t.Helper()
	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	put := func(b []byte) digest.Digest {
		d := digest.FromBytes(b)
		if err := os.WriteFile(filepath.Join(blobs, d.Encoded()), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return d
	}
	mustJSON := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	body := []byte(content)
	if err := tw.WriteHeader(&tar.Header{Name: "hello.txt", Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(body)
	tw.Close()
	var gzBuf bytes.Buffer
	gz := gzip.NewWriter(&gzBuf)
	gz.Write(tarBuf.Bytes())
	gz.Close()
	layer := put(gzBuf.Bytes())

	config := mustJSON(v1.Image{
		Platform: v1.Platform{Architecture: "amd64", OS: "linux"},
		Config:   v1.ImageConfig{Cmd: []string{"/hello.txt"}},
		RootFS:   v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(tarBuf.Bytes())}},
	})
	configDigest := put(config)

	manifestBody := mustJSON(v1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageManifest,
		Config:    v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: configDigest, Size: int64(len(config))},
		Layers:    []v1.Descriptor{{MediaType: v1.MediaTypeImageLayerGzip, Digest: layer, Size: int64(gzBuf.Len())}},
	})
	manifest := put(manifestBody)
	manifestDesc := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: manifest, Size: int64(len(manifestBody))}

	indexManifest := manifestDesc
	indexManifest.Platform = &v1.Platform{Architecture: "amd64", OS: "linux"}
	indexBody := mustJSON(v1.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{indexManifest},
	})
	index := put(indexBody)

	tagged := func(d v1.Descriptor, name string) v1.Descriptor {
		d.Annotations = map[string]string{v1.AnnotationRefName: name}
		return d
	}
	top := mustJSON(v1.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{
			tagged(manifestDesc, "v1"),
			tagged(v1.Descriptor{MediaType: v1.MediaTypeImageIndex, Digest: index, Size: int64(len(indexBody))}, "multi"),
		},
	})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), top, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, v1.ImageLayoutFile), mustJSON(v1.ImageLayout{Version: v1.ImageLayoutVersion}), 0o644); err != nil {
		t.Fatal(err)
	}
	return testImage{dir: dir, layer: layer, manifest: manifest, manifestBody: manifestBody, index: index, indexBody: indexBody}
}
