package registry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/testkit"
)

// client is a registry client holding one token for several repositories
// (a cross-repository mount needs pull on the source).
type client struct {
	t     *testing.T
	r     *testkit.KilnRegistry
	token string
}

func newClient(t *testing.T, r *testkit.KilnRegistry, repos ...string) *client {
	t.Helper()
	var access []auth.RegistryAccess
	for _, repo := range repos {
		access = append(access, auth.RegistryAccess{Type: "repository", Name: repo, Actions: []string{"pull", "push", "delete"}})
	}
	tok, err := r.Authority.IssueRegistryToken(auth.Principal{Subject: "client", Scopes: []auth.Scope{auth.ScopeImageWrite}}, "kiln", access)
	if err != nil {
		t.Fatal(err)
	}
	return &client{t: t, r: r, token: tok.Token}
}

// do sends a request to path (or an absolute URL) and fails the test
// unless the answer has status want; it returns the answer and its body.
func (c *client) do(method, path, contentType string, body []byte, want int) (*http.Response, []byte) {
	c.t.Helper()
	u, err := url.Parse(c.r.URL)
	if err != nil {
		c.t.Fatal(err)
	}
	ref, err := url.Parse(path)
	if err != nil {
		c.t.Fatal(err)
	}
	req, err := http.NewRequest(method, u.ResolveReference(ref).String(), bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Accept", v1.MediaTypeImageManifest+", "+v1.MediaTypeImageIndex)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		c.t.Fatalf("%s %s: %d, want %d: %s", method, path, resp.StatusCode, want, got)
	}
	return resp, got
}

// pushBlob uploads data to repo by digest d (any algorithm).
func (c *client) pushBlob(repo string, d digest.Digest, data []byte) {
	c.t.Helper()
	resp, _ := c.do(http.MethodPost, "/v2/"+repo+"/blobs/uploads/", "", nil, http.StatusAccepted)
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		c.t.Fatal(err)
	}
	q := loc.Query()
	q.Set("digest", d.String())
	loc.RawQuery = q.Encode()
	c.do(http.MethodPut, loc.String(), "application/octet-stream", data, http.StatusCreated)
}

// getBlob fetches blob d of repo and checks its content.
func (c *client) getBlob(repo string, d digest.Digest, want []byte) {
	c.t.Helper()
	resp, got := c.do(http.MethodGet, "/v2/"+repo+"/blobs/"+d.String(), "", nil, http.StatusOK)
	if !bytes.Equal(got, want) || resp.Header.Get("Docker-Content-Digest") != d.String() {
		c.t.Fatalf("GET blob %s of %s: %q (digest header %q), want %q", d, repo, got, resp.Header.Get("Docker-Content-Digest"), want)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSha512ContentAcrossRepositories: blobs and manifests pushed by
// sha512 reach a second repository by a client's cross-repository mount
// and by kiln's Tag, and pull there by their sha512 names.
func TestSha512ContentAcrossRepositories(t *testing.T) {
	ctx := context.Background()
	r := testkit.StartKilnRegistry(t)
	const src, mounted, tagged = "sha/src", "sha/mounted", "sha/tagged"
	c := newClient(t, r, src, mounted, tagged)

	layer := []byte("a layer pushed by its sha512")
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	layerD, configD := digest.SHA512.FromBytes(layer), digest.SHA512.FromBytes(config)
	c.pushBlob(src, layerD, layer)
	c.pushBlob(src, configD, config)

	// A client's mount: the blob GETs by sha512 in the target repository.
	resp, _ := c.do(http.MethodPost, "/v2/"+mounted+"/blobs/uploads/?mount="+layerD.String()+"&from="+src, "", nil, http.StatusCreated)
	if got := resp.Header.Get("Docker-Content-Digest"); got != layerD.String() {
		t.Fatalf("mount answered digest %q, want %s", got, layerD)
	}
	c.getBlob(mounted, layerD, layer)
	if resp, _ := c.do(http.MethodHead, "/v2/"+mounted+"/blobs/"+layerD.String(), "", nil, http.StatusOK); resp.ContentLength != int64(len(layer)) {
		t.Fatalf("HEAD of the mounted blob: length %d, want %d", resp.ContentLength, len(layer))
	}

	// An image whose blobs are named by sha512, pushed by its sha512
	// digest, and an index naming it by that digest.
	img := mustJSON(t, v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: configD, Size: int64(len(config))},
		Layers: []v1.Descriptor{{MediaType: v1.MediaTypeImageLayer, Digest: layerD, Size: int64(len(layer))}}})
	imgD := digest.SHA512.FromBytes(img)
	c.do(http.MethodPut, "/v2/"+src+"/manifests/"+imgD.String(), v1.MediaTypeImageManifest, img, http.StatusCreated)
	idx := mustJSON(t, v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex,
		Manifests: []v1.Descriptor{{MediaType: v1.MediaTypeImageManifest, Digest: imgD, Size: int64(len(img)),
			Platform: &v1.Platform{Architecture: "amd64", OS: "linux"}}}})
	c.do(http.MethodPut, "/v2/"+src+"/manifests/1", v1.MediaTypeImageIndex, idx, http.StatusCreated)

	if err := r.Registry.Tag(ctx, src, "1", tagged, "1"); err != nil {
		t.Fatal(err)
	}
	_, got := c.do(http.MethodGet, "/v2/"+tagged+"/manifests/1", "", nil, http.StatusOK)
	if !bytes.Equal(got, idx) {
		t.Fatalf("the tagged index is %s, want %s", got, idx)
	}
	resp, got = c.do(http.MethodGet, "/v2/"+tagged+"/manifests/"+imgD.String(), "", nil, http.StatusOK)
	if !bytes.Equal(got, img) || resp.Header.Get("Docker-Content-Digest") != imgD.String() {
		t.Fatalf("GET the child by sha512 in %s: digest %q, body %s", tagged, resp.Header.Get("Docker-Content-Digest"), got)
	}
	c.getBlob(tagged, layerD, layer)
	c.getBlob(tagged, configD, config)
}

// TestTagIndexesSubjects: manifests with a subject that kiln's Tag links
// into another repository (tagged themselves, or children of a tagged
// index) are listed by that repository's referrers API; a signature
// pushed to the source repository on its own stays there.
func TestTagIndexesSubjects(t *testing.T) {
	forEachStorage(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.start(t)
		const src, dst = "tag/src", "tag/dst"
		img := pushImage(t, r, src, "1", "tagged with referrers")
		sig := pushReferrer(t, r, src, "", "application/vnd.example.signature", img.manifest, "attached in src")
		sbom := pushReferrer(t, r, src, "sbom", "application/spdx+json", img.manifest, "tagged sbom")
		// An index holding the image and an artifact about it.
		vex := pushReferrer(t, r, src, "", "application/vnd.example.vex", img.manifest, "in the index")
		idx := mustJSON(t, v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex,
			Manifests: []v1.Descriptor{{MediaType: v1.MediaTypeImageManifest, Digest: img.manifest, Size: int64(len(img.body))}, vex}})
		r.PushManifest(t, src, "bundle", v1.MediaTypeImageIndex, idx)

		if err := r.Registry.Tag(ctx, src, "1", dst, "1"); err != nil {
			t.Fatal(err)
		}
		if got, _ := referrers(t, r, dst, img.manifest, ""); len(got) != 0 {
			t.Fatalf("referrers in %s after tagging the image only = %v; want none (a signature attached in %s stays there)", dst, got, src)
		}
		if err := r.Registry.Tag(ctx, src, "sbom", dst, "sbom"); err != nil {
			t.Fatal(err)
		}
		if err := r.Registry.Tag(ctx, src, "bundle", dst, "bundle"); err != nil {
			t.Fatal(err)
		}
		got, _ := referrers(t, r, dst, img.manifest, "")
		if len(got) != 2 || got[sbom.Digest].ArtifactType != sbom.ArtifactType || got[vex.Digest].Annotations["note"] != "in the index" {
			t.Fatalf("referrers in %s = %v; want the tagged SBOM and the index's artifact", dst, got)
		}
		if _, ok := got[sig.Digest]; ok {
			t.Fatalf("the signature attached in %s appeared in %s", src, dst)
		}
		if got, _ := referrers(t, r, src, img.manifest, ""); len(got) != 3 {
			t.Fatalf("referrers in %s after tagging = %v; want its three", src, got)
		}
		// The copied entries follow deletes in dst like pushed ones.
		deleteManifest(t, r, dst, sbom.Digest)
		if got, _ := referrers(t, r, dst, img.manifest, ""); len(got) != 1 || got[vex.Digest].Digest == "" {
			t.Fatalf("referrers in %s after deleting its SBOM = %v; want the index's artifact only", dst, got)
		}
		if got, _ := referrers(t, r, src, img.manifest, ""); len(got) != 3 {
			t.Fatalf("deleting the SBOM in %s changed %s's referrers: %v", dst, src, got)
		}
	})
}

// TestReferrersOfManifestsStoredBeforeTheIndex: a data dir from a kiln
// without a referrers index (manifests with a subject, but no _referrers
// entries) answers the referrers API completely after an upgrade; a
// manifest pushed by sha512 is listed once, by that digest.
func TestReferrersOfManifestsStoredBeforeTheIndex(t *testing.T) {
	forEachStorage(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		old := b.start(t)
		const repo = "old/signed"
		img := pushImage(t, old, repo, "1", "signed before the index")
		sig := pushReferrer(t, old, repo, "", "application/vnd.example.signature", img.manifest, "old signature")
		sbom := pushReferrer(t, old, repo, "sbom", "application/spdx+json", img.manifest, "old sbom")
		c := newClient(t, old, repo)
		art := mustJSON(t, v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
			ArtifactType: "application/vnd.example.sha512", Config: v1.DescriptorEmptyJSON, Layers: []v1.Descriptor{v1.DescriptorEmptyJSON},
			Subject: &v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: img.manifest, Size: int64(len(img.body))}})
		artD := digest.SHA512.FromBytes(art)
		c.pushBlob(repo, v1.DescriptorEmptyJSON.Digest, []byte("{}"))
		c.do(http.MethodPut, "/v2/"+repo+"/manifests/"+artD.String(), v1.MediaTypeImageManifest, art, http.StatusCreated)
		// What an older kiln left: the manifests, and no index.
		if err := old.Registry.Driver().Delete(ctx, "/docker/registry/v2/repositories/"+repo+"/_referrers"); err != nil {
			t.Fatal(err)
		}

		r := b.restart(t, old)
		got, _ := referrers(t, r, repo, img.manifest, "")
		if len(got) != 3 || got[sig.Digest].ArtifactType != sig.ArtifactType || got[sbom.Digest].Annotations["note"] != "old sbom" ||
			got[artD].ArtifactType != "application/vnd.example.sha512" || got[artD].Size != int64(len(art)) {
			t.Fatalf("referrers of an image signed before the index = %v; want the signature, the SBOM and the sha512 artifact", got)
		}
		if !b.stored(t, "/docker/registry/v2/repositories/"+repo+"/_referrers/sha256/"+img.manifest.Encoded()+"/sha256/"+sig.Digest.Encoded()) {
			t.Errorf("the backfilled index is not in the %s store", b.name)
		}
		// Indexed once: from now on deletes and pushes keep it.
		deleteManifest(t, r, repo, sig.Digest)
		later := pushReferrer(t, r, repo, "", "application/vnd.example.signature", img.manifest, "new signature")
		got, _ = referrers(t, r, repo, img.manifest, "?artifactType=application/vnd.example.signature")
		if len(got) != 1 || got[later.Digest].Digest == "" {
			t.Fatalf("signatures after deleting the old one and pushing another = %v; want the new one", got)
		}
	})
}
