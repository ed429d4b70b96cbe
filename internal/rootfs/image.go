package rootfs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// image is the resolved, single-platform image a conversion applies.
type image struct {
	manifestDigest string
	platform       string
	layers         []v1.Descriptor
	diffIDs        []digest.Digest
	layerBytes     int64
	config         ImageConfig
}

// Media types of the Docker v2 schema 2 formats, which registries and
// BuildKit still produce next to the OCI ones.
const (
	dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	dockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	dockerConfig       = "application/vnd.docker.container.image.v1+json"
	dockerLayerPrefix  = "application/vnd.docker.image.rootfs."
)

// Bounds on JSON documents, so a hostile blob cannot exhaust memory; the
// manifest bound is distribution's own.
const (
	maxManifestBytes = 4 << 20
	maxConfigBytes   = 8 << 20
	maxIndexDepth    = 4
)

// manifestDoc is the union of the fields of manifests and indexes.
type manifestDoc struct {
	SchemaVersion int             `json:"schemaVersion"`
	MediaType     string          `json:"mediaType"`
	Config        *v1.Descriptor  `json:"config"`
	Layers        []v1.Descriptor `json:"layers"`
	Manifests     []v1.Descriptor `json:"manifests"`
}

func resolveImage(ctx context.Context, src Source, dgst, platform string) (*image, error) {
	want := strings.SplitN(platform, "/", 3)
	d := digest.Digest(dgst)
	for depth := 0; ; depth++ {
		if depth > maxIndexDepth {
			return nil, unconvertiblef("image indexes nested deeper than %d levels", maxIndexDepth)
		}
		body, err := readBlob(ctx, src, d, maxManifestBytes)
		if err != nil {
			return nil, fmt.Errorf("read manifest: %w", err)
		}
		var doc manifestDoc
		if err := json.Unmarshal(body, &doc); err != nil {
			return nil, unconvertiblef("manifest %s is not valid JSON: %w", d, err)
		}
		if doc.SchemaVersion == 1 || strings.HasPrefix(doc.MediaType, "application/vnd.docker.distribution.manifest.v1") {
			return nil, unconvertiblef("manifest %s is Docker schema 1, which kiln cannot convert; push the image again with a current client", d)
		}
		switch {
		case doc.MediaType == v1.MediaTypeImageIndex || doc.MediaType == dockerManifestList ||
			(doc.MediaType == "" && doc.Manifests != nil && doc.Config == nil):
			child, err := pickPlatform(doc.Manifests, want)
			if err != nil {
				return nil, unconvertiblef("index %s: %w", d, err)
			}
			d = child
		case doc.MediaType == v1.MediaTypeImageManifest || doc.MediaType == dockerManifest ||
			(doc.MediaType == "" && doc.Config != nil):
			return loadManifest(ctx, src, d, doc, want)
		default:
			return nil, unconvertiblef("manifest %s has media type %q, which is not a container image manifest or index", d, doc.MediaType)
		}
	}
}

// pickPlatform returns the first manifest in an index for want (os, arch
// and, when given, variant). Descriptors without a platform count only when
// the index has nothing else, as in single-image OCI layouts; the image
// config's platform is checked afterwards either way.
func pickPlatform(descs []v1.Descriptor, want []string) (digest.Digest, error) {
	var seen, unplatformed []string
	var fallback digest.Digest
	for _, m := range descs {
		if m.MediaType != "" && !isManifestType(m.MediaType) {
			continue
		}
		if m.Platform == nil {
			unplatformed = append(unplatformed, m.Digest.String())
			fallback = m.Digest
			continue
		}
		p := m.Platform
		name := p.OS + "/" + p.Architecture
		if p.Variant != "" {
			name += "/" + p.Variant
		}
		seen = append(seen, name)
		if p.OS == want[0] && p.Architecture == want[1] && (len(want) < 3 || p.Variant == want[2]) {
			return m.Digest, nil
		}
	}
	if len(seen) == 0 && len(unplatformed) == 1 {
		return fallback, nil
	}
	if len(seen) == 0 {
		return "", fmt.Errorf("no image for platform %s (the index lists no platforms)", strings.Join(want, "/"))
	}
	return "", fmt.Errorf("no image for platform %s; the index has %s", strings.Join(want, "/"), strings.Join(seen, ", "))
}

func isManifestType(mt string) bool {
	switch mt {
	case v1.MediaTypeImageIndex, dockerManifestList, v1.MediaTypeImageManifest, dockerManifest:
		return true
	}
	return false
}

func isLayerType(mt string) bool {
	return strings.HasPrefix(mt, "application/vnd.oci.image.layer.") || strings.HasPrefix(mt, dockerLayerPrefix)
}

func loadManifest(ctx context.Context, src Source, d digest.Digest, doc manifestDoc, want []string) (*image, error) {
	if doc.Config.MediaType != v1.MediaTypeImageConfig && doc.Config.MediaType != dockerConfig {
		return nil, unconvertiblef("manifest %s is not a container image: its config has media type %q (an artifact, not something that boots)", d, doc.Config.MediaType)
	}
	body, err := readBlob(ctx, src, doc.Config.Digest, maxConfigBytes)
	if err != nil {
		return nil, fmt.Errorf("read image config: %w", err)
	}
	var cfg v1.Image
	if err := json.Unmarshal(body, &cfg); err != nil {
		return nil, unconvertiblef("image config %s is not valid JSON: %w", doc.Config.Digest, err)
	}
	if (cfg.OS != "" && cfg.OS != want[0]) || (cfg.Architecture != "" && cfg.Architecture != want[1]) {
		return nil, unconvertiblef("image %s is for %s/%s, not %s", d, cfg.OS, cfg.Architecture, strings.Join(want, "/"))
	}
	if len(cfg.RootFS.DiffIDs) != len(doc.Layers) {
		return nil, unconvertiblef("image %s lists %d layers but its config has %d diff_ids; the image is malformed", d, len(doc.Layers), len(cfg.RootFS.DiffIDs))
	}
	img := &image{
		manifestDigest: d.String(),
		platform:       want[0] + "/" + want[1],
		layers:         doc.Layers,
		diffIDs:        cfg.RootFS.DiffIDs,
		config: ImageConfig{
			Entrypoint: cfg.Config.Entrypoint,
			Cmd:        cfg.Config.Cmd,
			Env:        cfg.Config.Env,
			WorkingDir: cfg.Config.WorkingDir,
			User:       cfg.Config.User,
			StopSignal: cfg.Config.StopSignal,
			Labels:     cfg.Config.Labels,
		},
	}
	for i, l := range doc.Layers {
		if !isLayerType(l.MediaType) {
			return nil, unconvertiblef("layer %d (%s) has media type %q, which is not a filesystem layer", i+1, l.Digest, l.MediaType)
		}
		if err := l.Digest.Validate(); err != nil {
			return nil, unconvertiblef("layer %d has an invalid digest %q: %w", i+1, l.Digest, err)
		}
		if err := cfg.RootFS.DiffIDs[i].Validate(); err != nil {
			return nil, unconvertiblef("layer %d has an invalid diff_id %q: %w", i+1, cfg.RootFS.DiffIDs[i], err)
		}
		if l.Size < 0 {
			return nil, unconvertiblef("layer %d (%s) has a negative size", i+1, l.Digest)
		}
		img.layerBytes += l.Size
	}
	return img, nil
}

// readBlob reads a small blob whole and checks it against its digest.
// Content that passed the check is the image's own, so what callers find
// wrong with it is ErrUnconvertible; a damaged stored copy is not, as the
// registry's copy may be repaired.
func readBlob(ctx context.Context, src Source, d digest.Digest, limit int64) ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, unconvertiblef("invalid digest %q: %w", d, err)
	}
	rc, err := src.Blob(ctx, d.String())
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read blob %s: %w", d, err)
	}
	if n > limit {
		return nil, unconvertiblef("blob %s is larger than %d bytes, too large for a manifest or config", d, limit)
	}
	if got := d.Algorithm().FromBytes(buf.Bytes()); got != d {
		return nil, fmt.Errorf("blob %s has digest %s: the stored copy is corrupt; push the image again", d, got)
	}
	return buf.Bytes(), nil
}
