package testkit

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// SeedImage is a one-layer OCI image (linux/amd64) whose bytes depend on
// its seed alone: a file /seed holding the seed. Fakes at the runtime
// seam push it as a build's result.
type SeedImage struct {
	Layer, Config, Manifest []byte
	LayerDigest, Digest     string
}

// NewSeedImage builds the SeedImage of seed.
func NewSeedImage(seed string) SeedImage {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "seed", Mode: 0o644, Size: int64(len(seed)), Typeflag: tar.TypeReg})
	io.WriteString(tw, seed)
	tw.Close()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tb.Bytes())
	zw.Close()
	img := SeedImage{Layer: gz.Bytes()}
	img.Config, _ = json.Marshal(v1.Image{Platform: v1.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(tb.Bytes())}}})
	m := v1.Manifest{MediaType: v1.MediaTypeImageManifest,
		Config: v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: digest.FromBytes(img.Config), Size: int64(len(img.Config))},
		Layers: []v1.Descriptor{{MediaType: v1.MediaTypeImageLayerGzip, Digest: digest.FromBytes(img.Layer), Size: int64(len(img.Layer))}}}
	m.SchemaVersion = 2
	img.Manifest, _ = json.Marshal(m)
	img.LayerDigest = digest.FromBytes(img.Layer).String()
	img.Digest = digest.FromBytes(img.Manifest).String()
	return img
}
