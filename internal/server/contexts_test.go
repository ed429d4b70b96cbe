package server_test

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/buildcontext"
)

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// The context submission() sends as a tar, as a manifest.
var (
	manifestFiles = map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}
	manifest      = buildcontext.Manifest{Version: buildcontext.ManifestVersion, Entries: []buildcontext.ManifestEntry{
		{Path: "Dockerfile", Type: buildcontext.EntryFile, Mode: 0o644, Size: int64(len(manifestFiles["Dockerfile"])), Digest: sha(manifestFiles["Dockerfile"])},
		{Path: "f", Type: buildcontext.EntryFile, Mode: 0o644, Size: 1, Digest: sha("x")},
	}}
)

func (k *kiln) missing(token string, digests ...string) []string {
	k.t.Helper()
	var out api.BlobQueryResult
	k.json(token, "POST", "/v1/contexts/blobs/query", map[string]any{"digests": digests}, http.StatusOK, &out)
	return out.Missing
}

func (k *kiln) putBlobs(token string, contents ...string) (int, []byte) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, c := range contents {
		tw.WriteHeader(&tar.Header{Name: sha(c), Mode: 0o644, Size: int64(len(c)), Typeflag: tar.TypeReg})
		tw.Write([]byte(c))
	}
	tw.Close()
	return k.call(token, "POST", "/v1/contexts/blobs", &buf, "application/x-tar")
}

func (k *kiln) submitManifest(token string, m buildcontext.Manifest, fields ...[2]string) (int, []byte) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, f := range fields {
		mw.WriteField(f[0], f[1])
	}
	w, _ := mw.CreateFormFile("context_manifest", "manifest.json")
	json.NewEncoder(w).Encode(m)
	mw.Close()
	return k.call(token, "POST", "/v1/builds", &buf, mw.FormDataContentType())
}

func TestManifestUploadSendsOnlyWhatTheTenantsStoreLacks(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write", "build:read", "image:read")
	b := k.token("tenant-b", "build:write", "build:read", "image:read")
	all := []string{sha(manifestFiles["Dockerfile"]), sha("x")}

	if got := k.missing(a, all...); len(got) != 2 {
		t.Fatalf("empty store: missing %v", got)
	}
	if code, body := k.submitManifest(a, manifest); code != http.StatusConflict || !strings.Contains(string(body), `"missing_blobs"`) {
		t.Fatalf("manifest before its blobs: %d %s, want 409 missing_blobs", code, body)
	}
	if code, body := k.putBlobs(a, manifestFiles["Dockerfile"], "x"); code != http.StatusOK {
		t.Fatalf("put blobs: %d %s", code, body)
	}
	if got := k.missing(a, all...); len(got) != 0 {
		t.Errorf("after the upload: missing %v", got)
	}

	// Another tenant's store is its own: it learns nothing of tenant-a's
	// blobs and cannot build from them.
	if got := k.missing(b, all...); len(got) != 2 {
		t.Errorf("tenant-b sees tenant-a's blobs: missing %v", got)
	}
	if code, _ := k.submitManifest(b, manifest); code != http.StatusConflict {
		t.Errorf("tenant-b built from tenant-a's blobs: %d", code)
	}

	code, body := k.submitManifest(a, manifest, [2]string{"build_args", `{"N":"1"}`})
	if code != http.StatusAccepted {
		t.Fatalf("submit manifest: %d %s", code, body)
	}
	var viaManifest api.Build
	json.Unmarshal(body, &viaManifest)
	for deadline := time.Now().Add(30 * time.Second); viaManifest.Status != api.BuildStatusSucceeded; {
		if time.Now().After(deadline) || viaManifest.Status == api.BuildStatusFailed {
			t.Fatalf("manifest build: %s %v", viaManifest.Status, viaManifest.Error)
		}
		time.Sleep(20 * time.Millisecond)
		k.json(a, "GET", "/v1/builds/"+viaManifest.Id, nil, http.StatusOK, &viaManifest)
	}
	// The same context as a tar is the same build: it deduplicates.
	viaTar := k.submitAs(a, [2]string{"build_args", `{"N":"1"}`})
	if viaTar.InputHash == nil || viaManifest.InputHash == nil || *viaTar.InputHash != *viaManifest.InputHash {
		t.Fatalf("input hashes differ: tar %v, manifest %v", viaTar.InputHash, viaManifest.InputHash)
	}
	if viaTar.DedupOf == nil || *viaTar.DedupOf != viaManifest.Id {
		t.Errorf("the tar upload of the manifest's context did not dedup to it: %v", viaTar.DedupOf)
	}
}

func TestBlobUploadsAreVerified(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write")
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: sha("claimed"), Mode: 0o644, Size: 6, Typeflag: tar.TypeReg})
	tw.Write([]byte("actual"))
	tw.Close()
	if code, body := k.call(a, "POST", "/v1/contexts/blobs", &buf, "application/x-tar"); code != http.StatusBadRequest {
		t.Errorf("a blob under another digest: %d %s", code, body)
	}
	if got := k.missing(a, sha("claimed"), sha("actual")); len(got) != 2 {
		t.Errorf("a refused blob was kept: missing %v", got)
	}
}
