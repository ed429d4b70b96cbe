package rootfs

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"

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
	content := layoutContent{seen: map[digest.Digest]bool{}}
	if err := content.walk(ctx, s.src, root, raw, 0); err != nil {
		return fail(err)
	}
	desc := v1.Descriptor{MediaType: mediaType, Digest: root, Size: int64(len(raw))}
	if name != "" {
		desc.Annotations = map[string]string{v1.AnnotationRefName: name}
	}
	if err := writeLayout(ctx, s.src, w, desc, content, nil); err != nil {
		return fail(err)
	}
	return nil
}

// layoutContent is what an OCI image layout holds besides its index.json:
// manifests (their bytes, read once) and the configs and layers they
// name, each once.
type layoutContent struct {
	seen      map[digest.Digest]bool
	manifests []manifestBlob
	blobs     []v1.Descriptor
}

type manifestBlob struct {
	digest digest.Digest
	raw    []byte
}

// walk adds manifest d (raw) and everything below it.
func (l *layoutContent) walk(ctx context.Context, src Source, d digest.Digest, raw []byte, depth int) error {
	if depth > maxIndexDepth {
		return unconvertiblef("image indexes nested deeper than %d levels", maxIndexDepth)
	}
	l.seen[d] = true
	l.manifests = append(l.manifests, manifestBlob{d, raw})
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

// writeLayout writes an OCI image layout tar to w: the blob directories,
// c's manifests and blobs (copied from src, verified), oci-layout, an
// index.json naming root, then extra files (name → content).
func writeLayout(ctx context.Context, src Source, w io.Writer, root v1.Descriptor, c layoutContent, extra map[string][]byte) error {
	tw := tar.NewWriter(w)
	dirs := map[string]bool{}
	dir := func(d digest.Digest) error {
		for _, p := range []string{"blobs/", "blobs/" + d.Algorithm().String() + "/"} {
			if !dirs[p] {
				dirs[p] = true
				if err := tw.WriteHeader(&tar.Header{Name: p, Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for _, m := range c.manifests {
		if err := dir(m.digest); err != nil {
			return err
		}
	}
	for _, b := range c.blobs {
		if err := dir(b.Digest); err != nil {
			return err
		}
	}
	for _, m := range c.manifests {
		if err := tarFile(tw, blobName(m.digest), m.raw); err != nil {
			return err
		}
	}
	for _, b := range c.blobs {
		if err := copyBlob(ctx, src, tw, blobName(b.Digest), b); err != nil {
			return err
		}
	}
	index, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{root}})
	layout, _ := json.Marshal(v1.ImageLayout{Version: v1.ImageLayoutVersion})
	if err := tarFile(tw, v1.ImageLayoutFile, layout); err != nil {
		return err
	}
	if err := tarFile(tw, v1.ImageIndexFile, index); err != nil {
		return err
	}
	for _, name := range slices.Sorted(maps.Keys(extra)) {
		if err := tarFile(tw, name, extra[name]); err != nil {
			return err
		}
	}
	return tw.Close()
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
