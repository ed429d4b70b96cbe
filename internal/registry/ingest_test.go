package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
)

func TestIngestBlobsAndManifests(t *testing.T) {
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root := t.TempDir()
	reg, err := New(ctx, Config{RootDir: root, Authority: a, Grant: testPolicy(t).GrantRegistry, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	e := struct{ reg *Registry }{reg}
	layer := []byte("layer content for ingest")
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	ld, cd := digest.FromBytes(layer), digest.FromBytes(config)

	// Wrong content, too short, too long: refused, nothing stored or left.
	for name, body := range map[string][]byte{
		"wrong bytes": []byte("LAYER content for ingest"),
		"short":       layer[:5],
		"long":        append(append([]byte{}, layer...), 'x'),
	} {
		err := e.reg.PutBlob(ctx, "in/app", ld.String(), int64(len(layer)), bytes.NewReader(body))
		if !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s: PutBlob = %v, want ErrDigestMismatch", name, err)
		}
	}
	if ok, _ := e.reg.HasBlob(ctx, "in/app", ld.String()); ok {
		t.Fatal("mismatched content was stored")
	}
	uploads, _ := os.ReadDir(filepath.Join(root, "docker/registry/v2/repositories/in/app/_uploads"))
	if len(uploads) != 0 {
		t.Errorf("%d upload sessions left behind", len(uploads))
	}

	man := v1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageManifest,
		Config:    v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: cd, Size: int64(len(config))},
		Layers:    []v1.Descriptor{{MediaType: v1.MediaTypeImageLayerGzip, Digest: ld, Size: int64(len(layer))}},
	}
	body, _ := json.Marshal(man)
	if _, err := e.reg.PutManifest(ctx, "in/app", v1.MediaTypeImageManifest, body, "1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("manifest before its blobs: %v, want ErrNotFound", err)
	}

	for d, b := range map[digest.Digest][]byte{ld: layer, cd: config} {
		if err := e.reg.PutBlob(ctx, "in/app", d.String(), int64(len(b)), bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := e.reg.PutManifest(ctx, "in/app", v1.MediaTypeImageManifest, body, "1")
	if err != nil || got != digest.FromBytes(body).String() {
		t.Fatalf("PutManifest = %s, %v", got, err)
	}
	if d, err := e.reg.Resolve(ctx, "in/app", "1"); err != nil || d != got {
		t.Fatalf("tag 1 = %s, %v; want %s", d, err, got)
	}

	// Another repository gets the blobs linked from the store, no bytes.
	for _, d := range []digest.Digest{ld, cd} {
		ok, err := e.reg.LinkBlob(ctx, "other/app", d.String())
		if err != nil || !ok {
			t.Fatalf("LinkBlob(%s) = %v, %v", d, ok, err)
		}
	}
	if ok, err := e.reg.LinkBlob(ctx, "other/app", digest.FromString("never stored").String()); ok || err != nil {
		t.Fatalf("LinkBlob of unknown content = %v, %v; want false, nil", ok, err)
	}
	if _, err := e.reg.PutManifest(ctx, "other/app", v1.MediaTypeImageManifest, body, ""); err != nil {
		t.Fatalf("manifest over linked blobs: %v", err)
	}

	// An index may name children the repository does not hold.
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{
		{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromBytes(body), Size: int64(len(body)), Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}},
		{MediaType: v1.MediaTypeImageManifest, Digest: digest.FromString("arm64 child"), Size: 100, Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}},
	}}
	ib, _ := json.Marshal(idx)
	if _, err := e.reg.PutManifest(ctx, "in/app", v1.MediaTypeImageIndex, ib, "multi"); err != nil {
		t.Fatalf("partial index: %v", err)
	}
	if _, err := e.reg.PutManifest(ctx, "in/app", "application/vnd.docker.distribution.manifest.v1+prettyjws", body, ""); err == nil {
		t.Fatal("schema1 media type accepted")
	}
}
