package rootfs

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// ExportOCIIndex writes index dgst whole — every platform's image and
// every attestation manifest, as they are in the registry — as an OCI
// image layout tar whose index.json names the index: what `docker buildx
// build --platform a,b --output type=oci` writes. name, if set, is the
// index's reference name. A Docker manifest.json cannot describe an
// index, so there is none (docker load reads the OCI layout itself).
func (s *Store) ExportOCIIndex(ctx context.Context, dgst, name string, w io.Writer) error {
	if err := validDigest(dgst); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("export image index %s: %w", dgst, err) }
	root := digest.Digest(dgst)
	raw, err := readBlob(ctx, s.src, root, maxManifestBytes)
	if err != nil {
		return fail(err)
	}
	var doc manifestDoc
	if err := json.Unmarshal(raw, &doc); err != nil || doc.Manifests == nil {
		return fail(fmt.Errorf("%s is not an image index", dgst))
	}
	mediaType := doc.MediaType
	if mediaType == "" {
		mediaType = v1.MediaTypeImageIndex
	}

	// Manifests are read (and checked) before anything is written, so a
	// missing child fails the export with a clean error answer.
	w2 := &layoutWriter{seen: map[digest.Digest]bool{}}
	if err := w2.walk(ctx, s.src, root, raw, 0); err != nil {
		return fail(err)
	}
	desc := v1.Descriptor{MediaType: mediaType, Digest: root, Size: int64(len(raw))}
	if name != "" {
		desc.Annotations = map[string]string{v1.AnnotationRefName: name}
	}
	index, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{desc}})
	layout, _ := json.Marshal(v1.ImageLayout{Version: v1.ImageLayoutVersion})

	tw := tar.NewWriter(w)
	dirs := map[string]bool{}
	for _, d := range append(w2.manifestOrder, w2.blobs...) {
		dir := "blobs/" + d.Digest.Algorithm().String() + "/"
		for _, p := range []string{"blobs/", dir} {
			if !dirs[p] {
				dirs[p] = true
				if err := tw.WriteHeader(&tar.Header{Name: p, Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
					return fail(err)
				}
			}
		}
	}
	for _, d := range w2.manifestOrder {
		if err := tarFile(tw, blobName(d.Digest), w2.manifests[d.Digest]); err != nil {
			return fail(err)
		}
	}
	for _, b := range w2.blobs {
		if err := copyBlob(ctx, s.src, tw, blobName(b.Digest), b); err != nil {
			return fail(err)
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{v1.ImageLayoutFile, layout}, {v1.ImageIndexFile, index}} {
		if err := tarFile(tw, f.name, f.data); err != nil {
			return fail(err)
		}
	}
	if err := tw.Close(); err != nil {
		return fail(err)
	}
	return nil
}

// layoutWriter collects what an index export writes: each manifest's
// bytes (read once) and each config and layer descriptor, once.
type layoutWriter struct {
	seen          map[digest.Digest]bool
	manifests     map[digest.Digest][]byte
	manifestOrder []v1.Descriptor
	blobs         []v1.Descriptor
}

func (l *layoutWriter) walk(ctx context.Context, src Source, d digest.Digest, raw []byte, depth int) error {
	if depth > maxIndexDepth {
		return unconvertiblef("image indexes nested deeper than %d levels", maxIndexDepth)
	}
	if l.manifests == nil {
		l.manifests = map[digest.Digest][]byte{}
	}
	l.seen[d] = true
	l.manifests[d] = raw
	l.manifestOrder = append(l.manifestOrder, v1.Descriptor{Digest: d, Size: int64(len(raw))})
	var doc manifestDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		return fmt.Errorf("decode manifest %s: %w", d, err)
	}
	for _, child := range doc.Manifests {
		if l.seen[child.Digest] {
			continue
		}
		body, err := readBlob(ctx, src, child.Digest, maxManifestBytes)
		if err != nil {
			return fmt.Errorf("read manifest %s: %w", child.Digest, err)
		}
		if err := l.walk(ctx, src, child.Digest, body, depth+1); err != nil {
			return err
		}
	}
	leaves := doc.Layers
	if doc.Config != nil {
		leaves = append([]v1.Descriptor{*doc.Config}, leaves...)
	}
	for _, b := range leaves {
		if !l.seen[b.Digest] {
			l.seen[b.Digest] = true
			l.blobs = append(l.blobs, b)
		}
	}
	return nil
}

// blobName is a blob's path in an OCI image layout.
func blobName(d digest.Digest) string {
	return "blobs/" + d.Algorithm().String() + "/" + d.Encoded()
}

func tarFile(tw *tar.Writer, name string, data []byte) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}
