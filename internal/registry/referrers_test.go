package registry_test

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/testkit"
)

// pushReferrer pushes an artifact manifest whose subject is subject, by
// digest (or tag when tag is set), and checks the OCI-Subject answer.
func pushReferrer(t *testing.T, r *testkit.KilnRegistry, repo, tag, artifactType string, subject digest.Digest, note string) v1.Descriptor {
	t.Helper()
	empty := r.PushBlob(t, repo, v1.MediaTypeEmptyJSON, []byte("{}"))
	layer := r.PushBlob(t, repo, "application/vnd.example.sig", []byte("signature "+note))
	m := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest, ArtifactType: artifactType,
		Config: empty, Layers: []v1.Descriptor{layer}, Subject: &v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: subject, Size: 1},
		Annotations: map[string]string{"note": note}}
	body, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromBytes(body)
	ref := tag
	if ref == "" {
		ref = d.String()
	}
	resp := r.Do(t, repo, http.MethodPut, r.URL+"/v2/"+repo+"/manifests/"+ref, v1.MediaTypeImageManifest, body, http.StatusCreated)
	if got := resp.Header.Get("OCI-Subject"); got != subject.String() {
		t.Fatalf("push of a referrer: OCI-Subject %q, want %s", got, subject)
	}
	return v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: d, Size: int64(len(body)), ArtifactType: artifactType, Annotations: map[string]string{"note": note}}
}

// referrers GETs the referrers of subject in repo and returns the index's
// digests, checking the answer's form.
func referrers(t *testing.T, r *testkit.KilnRegistry, repo string, subject digest.Digest, query string) (map[digest.Digest]v1.Descriptor, http.Header) {
	t.Helper()
	resp, body := get(t, r, http.MethodGet, "puller", repo, "/v2/"+repo+"/referrers/"+subject.String()+query)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != v1.MediaTypeImageIndex {
		t.Fatalf("GET referrers of %s: %d %q: %s", subject, resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	var idx v1.Index
	if err := json.Unmarshal(body, &idx); err != nil || idx.SchemaVersion != 2 || idx.MediaType != v1.MediaTypeImageIndex || idx.Manifests == nil {
		t.Fatalf("referrers answer %s: %v", body, err)
	}
	out := map[digest.Digest]v1.Descriptor{}
	for _, d := range idx.Manifests {
		out[d.Digest] = d
	}
	return out, resp.Header
}

// TestReferrers checks the referrers API on every storage: a signature
// and an SBOM of a tagged image, filtering, a subject not pushed yet,
// and the index after a referrer is deleted, after the image's tag is
// deleted by kiln, and after registry GC (referrers survive GC).
func TestReferrers(t *testing.T) {
	forEachStorage(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.start(t)
		const repo = "app/signed"
		img := pushImage(t, r, repo, "1", "signed")
		if got, _ := referrers(t, r, repo, img.manifest, ""); len(got) != 0 {
			t.Fatalf("referrers of an image with none: %v, want an empty index", got)
		}
		sig := pushReferrer(t, r, repo, "", "application/vnd.example.signature", img.manifest, "sig")
		sbom := pushReferrer(t, r, repo, "sbom", "application/spdx+json", img.manifest, "sbom")
		got, h := referrers(t, r, repo, img.manifest, "")
		if len(got) != 2 || got[sig.Digest].ArtifactType != sig.ArtifactType || got[sbom.Digest].Annotations["note"] != "sbom" || got[sig.Digest].Size != sig.Size {
			t.Fatalf("referrers = %+v; want the signature and the SBOM", got)
		}
		if h.Get("OCI-Filters-Applied") != "" {
			t.Errorf("unfiltered answer says OCI-Filters-Applied %q", h.Get("OCI-Filters-Applied"))
		}
		got, h = referrers(t, r, repo, img.manifest, "?artifactType=application/spdx%2Bjson")
		if _, ok := got[sbom.Digest]; len(got) != 1 || !ok || h.Get("OCI-Filters-Applied") != "artifactType" {
			t.Fatalf("filtered referrers = %v (%q); want only the SBOM", got, h.Get("OCI-Filters-Applied"))
		}
		// A subject not pushed (yet) is accepted.
		later := digest.FromString("not pushed yet")
		pending := pushReferrer(t, r, repo, "", "application/vnd.example.signature", later, "early")
		if got, _ := referrers(t, r, repo, later, ""); len(got) != 1 || got[pending.Digest].Digest != pending.Digest {
			t.Fatalf("referrers of a missing subject = %v", got)
		}
		// Pull needs a token: no anonymous referrers.
		resp, err := http.Get(r.URL + "/v2/" + repo + "/referrers/" + img.manifest.String())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" {
			t.Fatalf("anonymous referrers: %d %q, want a 401 challenge", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}

		// Deleting a referrer drops it from the index.
		deleteManifest(t, r, repo, sig.Digest)
		if got, _ := referrers(t, r, repo, img.manifest, ""); len(got) != 1 || got[sbom.Digest].Digest == "" {
			t.Fatalf("referrers after deleting the signature = %v; want the SBOM only", got)
		}
		// GC keeps referrers of a kept image, even untagged ones.
		sig2 := pushReferrer(t, r, repo, "", "application/vnd.example.signature", img.manifest, "sig2")
		if _, err := r.Registry.GC(ctx); err != nil {
			t.Fatal(err)
		}
		got, _ = referrers(t, r, repo, img.manifest, "")
		if len(got) != 2 || got[sig2.Digest].Digest == "" || got[sbom.Digest].Digest == "" {
			t.Fatalf("referrers after GC = %v; want the SBOM and the second signature", got)
		}
		for d := range got {
			if !b.stored(t, blobData(d)) {
				t.Errorf("GC removed referrer %s", d)
			}
			resp, _ := get(t, r, http.MethodGet, "puller", repo, "/v2/"+repo+"/manifests/"+d.String())
			if resp.StatusCode != http.StatusOK {
				t.Errorf("GET referrer %s after GC: %d", d, resp.StatusCode)
			}
		}
		// The image deleted by kiln: its referrers stay listed (the
		// spec leaves it to the registry) and are kept by GC.
		if err := r.Registry.DeleteTag(ctx, repo, "1"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Registry.GC(ctx); err != nil {
			t.Fatal(err)
		}
		if got, _ := referrers(t, r, repo, img.manifest, ""); len(got) != 2 {
			t.Fatalf("referrers after the image is deleted and GC = %v; want both kept", got)
		}
		if b.stored(t, blobData(img.layer.Digest)) {
			t.Errorf("GC kept the deleted image's layer")
		}
		// The index is kept in the store, under the repository.
		if !b.stored(t, "/docker/registry/v2/repositories/"+repo+"/_referrers/sha256/"+img.manifest.Encoded()+"/sha256/"+sbom.Digest.Encoded()) {
			t.Errorf("the referrers index is not in the %s store", b.name)
		}
		// The tag fallback scheme (sha256-<hex> tags holding an index)
		// is plain tags, and still works.
		fallback := "sha256-" + img.manifest.Encoded()
		idx, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{sbom}})
		r.PushManifest(t, repo, fallback, v1.MediaTypeImageIndex, idx)
		if d, err := r.Registry.Resolve(ctx, repo, fallback); err != nil || d != digest.FromBytes(idx).String() {
			t.Fatalf("fallback tag resolves to %s, %v", d, err)
		}
	})
}

// deleteManifest deletes repo@d over the API, as a client with delete access.
func deleteManifest(t *testing.T, r *testkit.KilnRegistry, repo string, d digest.Digest) {
	t.Helper()
	tok, err := r.Authority.IssueRegistryToken(auth.Principal{Subject: "deleter", Scopes: []auth.Scope{auth.ScopeImageWrite}}, "kiln",
		[]auth.RegistryAccess{{Type: "repository", Name: repo, Actions: []string{"pull", "push", "delete"}}})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodDelete, r.URL+"/v2/"+repo+"/manifests/"+d.String(), nil)
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("DELETE %s@%s: %d, want 202", repo, d, resp.StatusCode)
	}
}
