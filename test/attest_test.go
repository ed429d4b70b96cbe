package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// scanScript is a tiny SBOM scanner following BuildKit's SBOM protocol:
// it writes one in-toto statement holding an SPDX 2.3 document for
// $BUILDKIT_SCAN_SOURCE to $BUILDKIT_SCAN_DESTINATION/<name>.spdx.json,
// listing the scanned root's files.
const scanScript = `#!/bin/sh
set -e
name=$(basename "$BUILDKIT_SCAN_SOURCE")
out="$BUILDKIT_SCAN_DESTINATION/$name.spdx.json"
files=""
for f in $(cd "$BUILDKIT_SCAN_SOURCE" && find . -type f | sort | head -20); do
  id=$(echo "$f" | tr -c 'A-Za-z0-9\n' '-')
  files="$files{\"fileName\":\"$f\",\"SPDXID\":\"SPDXRef-File$id\"},"
done
cat > "$out" <<SPDX
{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document","subject":[],
 "predicate":{"spdxVersion":"SPDX-2.3","dataLicense":"CC0-1.0","SPDXID":"SPDXRef-DOCUMENT","name":"kiln-test-scan-$name",
  "documentNamespace":"https://kiln.test/spdx/$name","creationInfo":{"created":"2026-01-01T00:00:00Z","creators":["Tool: kiln-test-scanner"]},
  "packages":[{"name":"kiln-test-package","SPDXID":"SPDXRef-Package-test","versionInfo":"1.0","downloadLocation":"NOASSERTION"}],
  "files":[${files%,}]}}
SPDX
`

// ociIndex is an OCI image index as kiln's registry serves it.
type ociIndex struct {
	MediaType string `json:"mediaType"`
	Manifests []struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Platform  *struct {
			OS           string `json:"os"`
			Architecture string `json:"architecture"`
		} `json:"platform"`
		Annotations map[string]string `json:"annotations"`
	} `json:"manifests"`
}

type ociManifest struct {
	Layers []struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Annotations map[string]string `json:"annotations"`
	} `json:"layers"`
}

type inToto struct {
	Type          string `json:"_type"`
	PredicateType string `json:"predicateType"`
	Subject       []struct {
		Name   string            `json:"name"`
		Digest map[string]string `json:"digest"`
	} `json:"subject"`
	Predicate json.RawMessage `json:"predicate"`
}

// attestations reads repo@digest as an index with one image and its
// attestation manifest, and returns the image's digest and the
// attestation statements by predicate type (decoded, and raw).
func (s *server) attestations(tok, repo, digest string) (string, map[string]inToto, map[string]string) {
	s.t.Helper()
	mt, body := s.manifest(tok, repo, digest)
	var idx ociIndex
	if err := json.Unmarshal(body, &idx); err != nil || mt != "application/vnd.oci.image.index.v1+json" {
		s.t.Fatalf("%s@%s is %s, want an OCI index (%v):\n%s", repo, digest, mt, err, body)
	}
	var image, att, ref string
	for _, m := range idx.Manifests {
		switch {
		case m.Annotations["vnd.docker.reference.type"] == "attestation-manifest":
			att, ref = m.Digest, m.Annotations["vnd.docker.reference.digest"]
			if m.Platform == nil || m.Platform.OS != "unknown" {
				s.t.Errorf("attestation manifest platform %+v, want unknown/unknown", m.Platform)
			}
		case m.Platform != nil && m.Platform.OS == "linux" && m.Platform.Architecture == "amd64":
			image = m.Digest
		}
	}
	if image == "" || att == "" {
		s.t.Fatalf("index of %s@%s has no linux/amd64 image or no attestation manifest:\n%s", repo, digest, body)
	}
	if ref != image {
		s.t.Errorf("attestation manifest refers to %s, the image is %s", ref, image)
	}
	_, body = s.manifest(tok, repo, att)
	var am ociManifest
	if err := json.Unmarshal(body, &am); err != nil {
		s.t.Fatal(err)
	}
	stmts, raws := map[string]inToto{}, map[string]string{}
	for _, l := range am.Layers {
		resp := s.registryGet(tok, repo, "blobs/"+l.Digest, "")
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			s.t.Fatalf("attestation blob %s: %d %s", l.Digest, resp.StatusCode, raw)
		}
		var st inToto
		if err := json.Unmarshal(raw, &st); err != nil {
			s.t.Fatalf("attestation layer %s is not an in-toto statement: %v\n%s", l.Digest, err, raw)
		}
		if st.PredicateType != l.Annotations["in-toto.io/predicate-type"] {
			s.t.Errorf("layer annotation says %q, statement %q", l.Annotations["in-toto.io/predicate-type"], st.PredicateType)
		}
		if !strings.HasPrefix(st.Type, "https://in-toto.io/Statement/") {
			s.t.Errorf("statement _type %q", st.Type)
		}
		found := false
		for _, sub := range st.Subject {
			found = found || "sha256:"+sub.Digest["sha256"] == image
		}
		if !found {
			s.t.Errorf("%s statement's subjects %+v do not name the image %s", st.PredicateType, st.Subject, image)
		}
		stmts[st.PredicateType], raws[st.PredicateType] = st, string(raw)
	}
	return image, stmts, raws
}

// provenanceOf is the SLSA provenance among stmts, decoded, and its
// statement's raw JSON.
func provenanceOf(t *testing.T, stmts map[string]inToto, raws map[string]string) (map[string]any, string) {
	t.Helper()
	for pt, st := range stmts {
		if strings.HasPrefix(pt, "https://slsa.dev/provenance/") {
			var p map[string]any
			if err := json.Unmarshal(st.Predicate, &p); err != nil {
				t.Fatalf("provenance predicate: %v", err)
			}
			return p, raws[pt]
		}
	}
	t.Fatalf("no SLSA provenance among %v", mapKeys(stmts))
	return nil, ""
}

func mapKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// provenanceArgs are the frontend args a SLSA v1 (or v0.2) provenance
// predicate records.
func provenanceArgs(p map[string]any) map[string]any {
	dig := func(v any, path ...string) any {
		for _, k := range path {
			m, _ := v.(map[string]any)
			v = m[k]
		}
		return v
	}
	for _, path := range [][]string{
		{"buildDefinition", "externalParameters", "request", "args"},
		{"invocation", "parameters", "args"},
	} {
		if m, ok := dig(p, path...).(map[string]any); ok {
			return m
		}
	}
	return nil
}

// Provenance (min and max) and an SBOM, as buildx asks BuildKit for them:
// the result is an index with an attestation manifest, the statements
// parse, name the build's inputs, never hold a secret's value, and the
// image still exports.
func TestAttestProvenanceAndSBOM(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.admin
	baseResp := s.registryGet(tok, "base/busybox", "manifests/latest",
		"application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	baseResp.Body.Close()
	baseDigest := baseResp.Header.Get("Docker-Content-Digest")
	if baseDigest == "" {
		t.Fatal("no digest for base/busybox:latest")
	}

	// The scanner, built by kiln itself.
	scanDir := t.TempDir()
	testkit.WriteFiles(t, scanDir, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nCOPY scan.sh /scan.sh\nENTRYPOINT [\"/bin/sh\", \"/scan.sh\"]\n", base),
		"scan.sh":    scanScript,
	})
	if out, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "-t", "attest/scanner:1", scanDir); code != 0 {
		t.Fatalf("build the scanner: exit %d\n%s\n%s", code, out, errOut)
	}

	const secretValue = "s3cr3t-value-never-in-provenance"
	secretFile := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(secretFile, []byte(secretValue), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
ARG VERSION
RUN --mount=type=secret,id=tok test "$(wc -c < /run/secrets/tok)" -eq %d && echo "v$VERSION" > /version
`, base, len(secretValue))})

	build := func(args ...string) string {
		t.Helper()
		args = append(append([]string{"build", "-q", "--secret", "id=tok,src=" + secretFile}, args...), dir)
		out, errOut, code := s.kilnSplit(tok, nil, args...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\n%s\n%s", strings.Join(args, " "), code, out, errOut)
		}
		return strings.TrimSpace(out)
	}

	t.Run("provenance max and an sbom from the test scanner", func(t *testing.T) {
		digest := build("-t", "attest/app:max", "--provenance=mode=max", "--build-arg", "VERSION=42",
			"--sbom=generator="+s.addr+"/attest/scanner:1")
		image, stmts, raws := s.attestations(tok, "attest/app", digest)
		p, raw := provenanceOf(t, stmts, raws)
		if args := provenanceArgs(p); args["build-arg:VERSION"] != "42" {
			t.Errorf("max provenance args %v, want build-arg:VERSION=42", args)
		}
		if !strings.Contains(raw, strings.TrimPrefix(baseDigest, "sha256:")) {
			t.Errorf("max provenance does not name the base image %s:\n%s", baseDigest, raw)
		}
		if strings.Contains(raw, secretValue) {
			t.Errorf("the secret's value is in the provenance")
		}
		st, ok := stmts["https://spdx.dev/Document"]
		if !ok {
			t.Fatalf("no SPDX SBOM among %v", mapKeys(stmts))
		}
		var doc struct {
			SPDXVersion string `json:"spdxVersion"`
			Name        string `json:"name"`
			Files       []struct {
				FileName string `json:"fileName"`
			} `json:"files"`
		}
		if err := json.Unmarshal(st.Predicate, &doc); err != nil || doc.SPDXVersion != "SPDX-2.3" || doc.Name != "kiln-test-scan-sbom" {
			t.Fatalf("SBOM predicate (%v): %s", err, st.Predicate)
		}
		saw := false
		for _, f := range doc.Files {
			saw = saw || f.FileName == "./version"
		}
		if !saw {
			t.Errorf("the SBOM does not list the image's /version: %s", st.Predicate)
		}

		// kiln images show lists the image and its attestations.
		out, errOut, code := s.kilnSplit(tok, nil, "images", "show", "attest/app:max")
		if code != 0 || !strings.Contains(out, image) || !strings.Contains(out, "https://spdx.dev/Document") ||
			!strings.Contains(out, "https://slsa.dev/provenance/") || !strings.Contains(out, "linux/amd64") {
			t.Errorf("kiln images show: exit %d\n%s\n%s", code, out, errOut)
		}
		t.Logf("kiln images show attest/app:max:\n%s", out)
		var shown struct {
			Type         string `json:"type"`
			Attestations []struct {
				Predicates []struct {
					Type string `json:"type"`
				} `json:"predicates"`
			} `json:"attestations"`
		}
		if out, errOut, code := s.kilnSplit(tok, nil, "images", "show", "--json", "attest/app:max"); code != 0 || json.Unmarshal([]byte(out), &shown) != nil ||
			shown.Type != "index" || len(shown.Attestations) != 1 || len(shown.Attestations[0].Predicates) != 2 {
			t.Errorf("kiln images show --json: exit %d, want an index with one attestation manifest of two predicates\n%s\n%s", code, out, errOut)
		}
		// The index converts (kiln run picks the linux/amd64 image).
		if im := s.waitRootFS("attest%2Fapp:max"); im.Rootfs.Status != api.RootFSStatusReady {
			t.Errorf("root filesystem of attest/app:max: %+v", im.Rootfs)
		}
		// -o type=local still exports the image's files.
		outDir := t.TempDir()
		if out, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--secret", "id=tok,src="+secretFile, "--provenance=mode=max",
			"--build-arg", "VERSION=42", "-o", "type=local,dest="+outDir, "-o", "type=tar,dest="+outDir+".tar", dir); code != 0 {
			t.Fatalf("build with -o type=local and type=tar: exit %d\n%s\n%s", code, out, errOut)
		}
		if b, err := os.ReadFile(filepath.Join(outDir, "version")); err != nil || string(b) != "v42\n" {
			t.Errorf("exported /version %q (%v)", b, err)
		}
		if tf, err := exec.Command("tar", "-tf", outDir+".tar").CombinedOutput(); err != nil || !regexp.MustCompile(`(?m)^(\./)?version$`).Match(tf) {
			t.Errorf("-o type=tar (%v) has no /version:\n%s", err, tf)
		}
	})

	t.Run("provenance min names the inputs but no build args", func(t *testing.T) {
		digest := build("-t", "attest/app:min", "--provenance=true", "--build-arg", "VERSION=7")
		_, stmts, raws := s.attestations(tok, "attest/app", digest)
		if len(stmts) != 1 {
			t.Errorf("want provenance alone, got %v", mapKeys(stmts))
		}
		p, raw := provenanceOf(t, stmts, raws)
		if _, ok := provenanceArgs(p)["build-arg:VERSION"]; ok {
			t.Errorf("min provenance records build args: %v", provenanceArgs(p))
		}
		if !strings.Contains(raw, strings.TrimPrefix(baseDigest, "sha256:")) {
			t.Errorf("min provenance does not name the base image %s:\n%s", baseDigest, raw)
		}
		if strings.Contains(raw, secretValue) {
			t.Errorf("the secret's value is in the provenance")
		}
	})

	t.Run("a build asking for attestations is not answered by one without them", func(t *testing.T) {
		plain := t.TempDir()
		testkit.WriteFiles(t, plain, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo dedup > /d\n", base)})
		buildID := func(args ...string) api.Build {
			t.Helper()
			meta := filepath.Join(t.TempDir(), "meta.json")
			args = append(append([]string{"build", "-q", "--metadata-file", meta}, args...), plain)
			if out, errOut, code := s.kilnSplit(tok, nil, args...); code != 0 {
				t.Fatalf("kiln %s: exit %d\n%s\n%s", strings.Join(args, " "), code, out, errOut)
			}
			var md map[string]any
			b, _ := os.ReadFile(meta)
			json.Unmarshal(b, &md)
			id, _ := md["kiln.build.id"].(string)
			return s.get(tok, id)
		}
		first := buildID()
		withProv := buildID("--provenance=mode=max")
		if withProv.DedupOf != nil && *withProv.DedupOf != "" {
			t.Errorf("provenance build answered by %s, which has none", *withProv.DedupOf)
		}
		if again := buildID("--provenance=mode=max"); again.DedupOf == nil || *again.DedupOf != withProv.Id {
			t.Errorf("an identical provenance build was not answered by %s: %+v", withProv.Id, again.DedupOf)
		}
		if again := buildID(); again.DedupOf == nil || *again.DedupOf != first.Id {
			t.Errorf("an identical plain build was not answered by %s: %+v", first.Id, again.DedupOf)
		}
	})

	t.Run("without attestations the result stays a plain image", func(t *testing.T) {
		digest := build("-t", "attest/app:none", "--build-arg", "VERSION=1")
		if mt, _ := s.manifest(tok, "attest/app", digest); mt == "application/vnd.oci.image.index.v1+json" {
			t.Errorf("a build without attestations produced an index")
		}
	})
}

// The server's default SBOM scanner (attest.sbom_generator) is reached
// through kiln's base-image mirror: pinned at submission, copied into
// mirror/ when the build starts, and run by BuildKit from there. The
// "upstream" is a loopback registry standing in for docker.io.
func TestAttestDefaultSBOMGeneratorThroughTheMirror(t *testing.T) {
	upstream := testkit.RegistryWithAuth(t, "up-user", "up-pass")
	s := startServer(t, withArgs(
		"--mirror-endpoints", fmt.Sprintf(`{"docker.io":"http://%s"}`, upstream),
		"--mirror-credentials", `{"docker.io":{"username":"up-user","password":"up-pass"}}`,
		"--attest-sbom-generator", "kiln-test/scanner:1"))
	base := s.base()
	tok := s.admin
	scanDir := t.TempDir()
	testkit.WriteFiles(t, scanDir, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nCOPY scan.sh /scan.sh\nENTRYPOINT [\"/bin/sh\", \"/scan.sh\"]\n", base),
		"scan.sh":    scanScript,
	})
	if out, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "-t", "local/scanner:1", scanDir); code != 0 {
		t.Fatalf("build the scanner: exit %d\n%s\n%s", code, out, errOut)
	}
	copyImage(t, "kiln:"+tok, s.addr+"/local/scanner:1", "up-user:up-pass", upstream+"/kiln-test/scanner:1")

	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo hi > /hi\n", base)})
	out, errOut, code := s.kilnSplit(tok, nil, "build", "-q", "--sbom=true", "-t", "app:sbom", dir)
	if code != 0 {
		t.Fatalf("kiln build --sbom=true: exit %d\n%s\n%s", code, out, errOut)
	}
	_, stmts, _ := s.attestations(tok, "app", strings.TrimSpace(out))
	if _, ok := stmts["https://spdx.dev/Document"]; !ok || len(stmts) != 1 {
		t.Errorf("want the SBOM alone, got %v", mapKeys(stmts))
	}
	if !skopeoOK("kiln:"+tok, "docker://"+s.addr+"/mirror/docker.io/kiln-test/scanner:1") {
		t.Errorf("the scanner is not in kiln's mirror")
	}
}
