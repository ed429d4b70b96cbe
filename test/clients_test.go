package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// Real registry clients against kiln's registry, each logging in with a
// kiln token as docker does: oras attaches a signature to an image kiln
// built and finds it through the referrers API (and after deletes and
// GC), skopeo reads an image index raw, crane copies an image with its
// attestation manifests to another repository and another registry.
func TestClients(t *testing.T) {
	s := startServer(t)
	base := s.base()
	// A tenant's token: the images are team/…, and every client works
	// with what a team member's token grants.
	tok := s.token("member", "team", "build:read", "build:write", "image:read", "image:write")
	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf("ARG BASE=%s\nFROM ${BASE}\nRUN echo clients > /clients\n", base)})
	build := func(t *testing.T, tag string, args ...string) string {
		t.Helper()
		args = append(append([]string{"build", "-q", "-t", tag}, args...), dir)
		out, errOut, code := s.kilnSplit(tok, nil, args...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\n%s\n%s", strings.Join(args, " "), code, out, errOut)
		}
		return strings.TrimSpace(out)
	}
	// An image with a provenance attestation: an index holding the
	// linux/amd64 image and its attestation manifest.
	idx := build(t, "app:1", "--provenance=mode=min")
	home := t.TempDir()

	t.Run("skopeo inspect --raw of an index", func(t *testing.T) {
		reader := s.token("auditor", "team", "image:read")
		for _, c := range []struct {
			name string
			args []string
			// platforms are the images the index must hold, each with
			// its attestation manifest.
			platforms []string
		}{
			{"an image with attestations", []string{"--provenance=mode=min"}, []string{"linux/amd64"}},
			{"two platforms", []string{"--platform", "linux/amd64,linux/arm64", "--provenance=mode=min", "--build-arg", "BASE=" + s.multiBase()},
				[]string{"linux/amd64", "linux/arm64"}},
		} {
			t.Run(c.name, func(t *testing.T) {
				tag := "inspect:" + strings.ReplaceAll(c.name, " ", "-")
				d := build(t, tag, c.args...)
				ref := "docker://" + s.addr + "/team/" + tag
				raw := run(t, home, "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+reader, ref)
				if got := sha256Of(raw); got != d {
					t.Fatalf("skopeo inspect --raw %s: content hashes to %s, kiln built %s:\n%s", ref, got, d, raw)
				}
				images, atts := indexChildren(t, []byte(raw))
				if got := mapKeys(images); !sameSet(got, c.platforms) {
					t.Fatalf("index platforms %v, want %v:\n%s", got, c.platforms, raw)
				}
				for platform, image := range images {
					if _, ok := atts[image]; !ok {
						t.Errorf("the %s image %s has no attestation manifest in the index:\n%s", platform, image, raw)
					}
				}
				// Each child inspects raw by digest with the same token.
				for _, child := range append(mapValues(images), mapValues(atts)...) {
					ref := "docker://" + s.addr + "/team/inspect@" + child
					if got := sha256Of(run(t, home, "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+reader, ref)); got != child {
						t.Errorf("skopeo inspect --raw %s hashes to %s", ref, got)
					}
				}
			})
		}
	})

	t.Run("crane copy keeps the attestation manifests", func(t *testing.T) {
		crane := testkit.Crane(t)
		// crane logs in from a docker config, as users do.
		cfg := t.TempDir()
		auth := base64.StdEncoding.EncodeToString([]byte("kiln:" + tok))
		if err := os.WriteFile(filepath.Join(cfg, "config.json"), fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, s.addr, auth), 0o600); err != nil {
			t.Fatal(err)
		}
		env := []string{"DOCKER_CONFIG=" + cfg}
		second := testkit.Registry(t)
		read := func(args ...string) string {
			t.Helper()
			return runEnv(t, home, env, crane, append([]string{"--insecure"}, args...)...)
		}
		// Into another repository of kiln's registry (crane mounts the
		// blobs across), and into another registry.
		for _, dst := range []string{s.addr + "/team/copied", second + "/team/app"} {
			runEnv(t, home, env, crane, "copy", "--insecure", s.addr+"/team/app:1", dst+":1")
			checkAttestedCopy(t, read, dst, ":1", idx)
		}
		// skopeo copies the whole index too, digests kept.
		dst := second + "/skopeo/app"
		run(t, home, "skopeo", "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
			"--src-creds", "kiln:"+tok, "docker://"+s.addr+"/team/app:1", "docker://"+dst+":1")
		checkAttestedCopy(t, read, dst, ":1", idx)
	})

	t.Run("oras attach, discover and the referrers API", func(t *testing.T) {
		oras := testkit.Oras(t)
		login := []string{"--plain-http", "-u", "kiln", "-p", tok}
		orasRun := func(args ...string) string {
			t.Helper()
			return run(t, home, oras, append(args, login...)...)
		}
		repo := s.addr + "/team/app"
		const sigType, sbomType = "application/vnd.example.signature", "application/vnd.example.sbom"
		work := t.TempDir()
		attach := func(artifactType, file, content string) string {
			t.Helper()
			if err := os.WriteFile(filepath.Join(work, file), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(oras, append([]string{"attach", "--format", "json", "--artifact-type", artifactType,
				"--annotation", "org.example.signer=kiln-test", repo + "@" + idx, file + ":" + artifactType + ".v1"}, login...)...)
			cmd.Dir, cmd.Env = work, append(os.Environ(), "HOME="+home)
			out, errOut, code := runSplit(t, cmd)
			var got struct{ Digest string }
			if code != 0 || json.Unmarshal([]byte(out), &got) != nil || got.Digest == "" {
				t.Fatalf("oras attach %s: exit %d\n%s\n%s", artifactType, code, out, errOut)
			}
			return got.Digest
		}
		sig := attach(sigType, "sig.txt", "signature of "+idx)
		sbom := attach(sbomType, "sbom.txt", "sbom of "+idx)

		// oras saw OCI-Subject and used the referrers API, not the tag
		// fallback (a sha256-<hex> tag listing the referrers).
		resp := s.registryGet(tok, "team/app", "tags/list", "")
		tags, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(tags), "sha256-") {
			t.Errorf("oras fell back to the referrers tag scheme: tags %s", tags)
		}

		discover := func(ref string, args ...string) map[string]string {
			t.Helper()
			out := orasRun(append([]string{"discover", "--format", "json", "--depth", "1", ref}, args...)...)
			var root struct {
				Referrers []struct {
					Digest       string
					ArtifactType string
					Annotations  map[string]string
				}
			}
			if err := json.Unmarshal([]byte(out), &root); err != nil {
				t.Fatalf("oras discover %s: %v\n%s", ref, err, out)
			}
			got := map[string]string{}
			for _, r := range root.Referrers {
				got[r.Digest] = r.ArtifactType
				if r.Annotations["org.example.signer"] != "kiln-test" {
					t.Errorf("referrer %s lost its annotations: %v", r.Digest, r.Annotations)
				}
			}
			return got
		}
		want := map[string]string{sig: sigType, sbom: sbomType}
		if got := discover(repo + "@" + idx); !mapsEqual(got, want) {
			t.Fatalf("oras discover = %v, want %v", got, want)
		}
		if got := discover(repo+":1", "--artifact-type", sigType); !mapsEqual(got, map[string]string{sig: sigType}) {
			t.Fatalf("oras discover --artifact-type %s = %v, want the signature", sigType, got)
		}
		if got, filtered := referrersAPI(t, s, tok, "team/app", idx, ""); !mapsEqual(got, want) || filtered != "" {
			t.Fatalf("GET referrers = %v (OCI-Filters-Applied %q), want %v unfiltered", got, filtered, want)
		}
		if got, filtered := referrersAPI(t, s, tok, "team/app", idx, sigType); !mapsEqual(got, map[string]string{sig: sigType}) || filtered != "artifactType" {
			t.Fatalf("GET referrers?artifactType=%s = %v (OCI-Filters-Applied %q), want the signature, filtered", sigType, got, filtered)
		}
		// The signature pulls back as attached.
		out := t.TempDir()
		orasRun("pull", "-o", out, repo+"@"+sig)
		if b, err := os.ReadFile(filepath.Join(out, "sig.txt")); err != nil || string(b) != "signature of "+idx {
			t.Fatalf("oras pull of the signature: %q, %v", b, err)
		}

		// oras cp -r copies the image with its referrers; in the new
		// repository they refer to the same subject.
		run(t, home, oras, "cp", "-r", "--from-plain-http", "--to-plain-http", "--from-username", "kiln", "--from-password", tok,
			"--to-username", "kiln", "--to-password", tok, repo+":1", s.addr+"/team/signed:1")
		if got := discover(s.addr + "/team/signed@" + idx); !mapsEqual(got, want) {
			t.Fatalf("oras discover in the copy = %v, want %v", got, want)
		}
		if got, _ := referrersAPI(t, s, tok, "team/signed", idx, ""); !mapsEqual(got, want) {
			t.Fatalf("GET referrers in the copy = %v, want %v", got, want)
		}

		// A deleted signature is no longer listed.
		orasRun("manifest", "delete", "--force", repo+"@"+sig)
		onlySBOM := map[string]string{sbom: sbomType}
		if got := discover(repo + "@" + idx); !mapsEqual(got, onlySBOM) {
			t.Fatalf("oras discover after deleting the signature = %v, want the SBOM only", got)
		}
		if got, _ := referrersAPI(t, s, tok, "team/app", idx, sigType); len(got) != 0 {
			t.Fatalf("GET referrers?artifactType=%s after deleting it = %v, want none", sigType, got)
		}
		if got, _ := referrersAPI(t, s, tok, "team/signed", idx, ""); !mapsEqual(got, want) {
			t.Fatalf("deleting the signature in team/app changed team/signed's referrers: %v", got)
		}

		// The image deleted and the registry collected: its remaining
		// referrer stays listed (the spec leaves that to the registry;
		// kiln keeps signatures of a re-tagged image), and whatever is
		// listed still pulls; the deleted signature is gone for good.
		if resp := s.do(tok, "DELETE", "/v1/images/team/app:1", nil, ""); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("delete team/app:1: %d", resp.StatusCode)
		}
		if resp := s.registryGet(tok, "team/app", "manifests/"+idx, "application/vnd.oci.image.index.v1+json"); resp.StatusCode != http.StatusNotFound {
			resp.Body.Close()
			t.Fatalf("the deleted image still answers in team/app: %d", resp.StatusCode)
		}
		if out, code := s.kiln(s.admin, "registry", "gc"); code != 0 {
			t.Fatalf("kiln registry gc: exit %d\n%s", code, out)
		}
		if got, _ := referrersAPI(t, s, tok, "team/app", idx, ""); !mapsEqual(got, onlySBOM) {
			t.Fatalf("GET referrers after deleting the image and GC = %v, want the SBOM", got)
		}
		// (oras discover resolves the subject first, and it is gone.)
		out = t.TempDir()
		orasRun("pull", "-o", out, repo+"@"+sbom)
		if b, err := os.ReadFile(filepath.Join(out, "sbom.txt")); err != nil || string(b) != "sbom of "+idx {
			t.Fatalf("oras pull of the SBOM after GC: %q, %v", b, err)
		}
		if _, err := tryRun(home, oras, append([]string{"manifest", "fetch", repo + "@" + sig}, login...)...); err == nil {
			t.Errorf("the deleted signature still fetches after GC")
		}
	})
}

// checkAttestedCopy checks that repo+tag (a copy of the index want) is
// that index, and that its images and attestation manifests, and the
// attestations' statements, are all in repo; crane runs crane.
func checkAttestedCopy(t *testing.T, crane func(args ...string) string, repo, tag, want string) {
	t.Helper()
	ref := repo + tag
	if got := strings.TrimSpace(crane("digest", ref)); got != want {
		t.Fatalf("%s has digest %s, the copied index is %s", ref, got, want)
	}
	images, atts := indexChildren(t, []byte(crane("manifest", ref)))
	if len(images) == 0 || len(atts) == 0 {
		t.Fatalf("%s lost its images or attestation manifests: images %v, attestations %v", ref, images, atts)
	}
	for _, image := range images {
		if got := sha256Of(crane("manifest", repo+"@"+image)); got != image {
			t.Errorf("image %s in %s hashes to %s", image, repo, got)
		}
	}
	for image, att := range atts {
		body := crane("manifest", repo+"@"+att)
		var m ociManifest
		if err := json.Unmarshal([]byte(body), &m); err != nil || len(m.Layers) == 0 {
			t.Fatalf("attestation manifest %s in %s (%v):\n%s", att, repo, err, body)
		}
		for _, l := range m.Layers {
			var st inToto
			raw := crane("blob", repo+"@"+l.Digest)
			if err := json.Unmarshal([]byte(raw), &st); err != nil || st.PredicateType != l.Annotations["in-toto.io/predicate-type"] {
				t.Fatalf("attestation %s in %s is not the in-toto statement its manifest announces (%v):\n%s", l.Digest, repo, err, raw)
			}
			if len(st.Subject) == 0 || "sha256:"+st.Subject[0].Digest["sha256"] != image {
				t.Errorf("attestation %s in %s is about %+v, want the image %s", l.Digest, repo, st.Subject, image)
			}
		}
	}
}

// indexChildren reads an image index: its images by platform
// (os/arch[/variant]), and its attestation manifests by the image
// digest they are about.
func indexChildren(t *testing.T, raw []byte) (images, atts map[string]string) {
	t.Helper()
	var idx struct {
		MediaType string `json:"mediaType"`
		Manifests []struct {
			Digest   string `json:"digest"`
			Platform *struct {
				OS           string `json:"os"`
				Architecture string `json:"architecture"`
				Variant      string `json:"variant"`
			} `json:"platform"`
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(raw, &idx); err != nil || idx.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("not an OCI image index (%v):\n%s", err, raw)
	}
	images, atts = map[string]string{}, map[string]string{}
	for _, m := range idx.Manifests {
		switch {
		case m.Annotations["vnd.docker.reference.type"] == "attestation-manifest":
			atts[m.Annotations["vnd.docker.reference.digest"]] = m.Digest
		case m.Platform != nil:
			p := m.Platform.OS + "/" + m.Platform.Architecture
			if m.Platform.Variant != "" {
				p += "/" + m.Platform.Variant
			}
			images[p] = m.Digest
		}
	}
	return images, atts
}

// referrersAPI GETs the referrers of subject in repo (with an
// artifactType filter unless "") and returns them, digest to artifact
// type, and the OCI-Filters-Applied header.
func referrersAPI(t *testing.T, s *server, tok, repo, subject, artifactType string) (map[string]string, string) {
	t.Helper()
	p := "referrers/" + subject
	if artifactType != "" {
		p += "?artifactType=" + url.QueryEscape(artifactType)
	}
	resp := s.registryGet(tok, repo, p, "")
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var idx struct {
		MediaType string `json:"mediaType"`
		Manifests []struct {
			Digest       string `json:"digest"`
			ArtifactType string `json:"artifactType"`
		} `json:"manifests"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &idx) != nil || idx.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("GET /v2/%s/%s: %d %s", repo, p, resp.StatusCode, body)
	}
	got := map[string]string{}
	for _, m := range idx.Manifests {
		got[m.Digest] = m.ArtifactType
	}
	return got, resp.Header.Get("OCI-Filters-Applied")
}

// run runs a client with HOME set to home (so no credentials of the
// machine's user are used) and returns its stdout, failing the test with
// its output if it fails.
func run(t *testing.T, home, bin string, args ...string) string {
	t.Helper()
	return runEnv(t, home, nil, bin, args...)
}

func runEnv(t *testing.T, home string, env []string, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(append(os.Environ(), "HOME="+home), env...)
	out, errOut, code := runSplit(t, cmd)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\n%s\n%s", filepath.Base(bin), strings.Join(redact(args), " "), code, out, errOut)
	}
	return out
}

// tryRun is run for a command expected to fail.
func tryRun(home, bin string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "HOME="+home)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// redact hides the token in a failed command's arguments.
func redact(args []string) []string {
	out := slices.Clone(args)
	for i, a := range out {
		if i > 0 && (strings.HasSuffix(out[i-1], "password") || out[i-1] == "-p") || strings.HasPrefix(a, "kiln:") {
			out[i] = "<token>"
		}
	}
	return out
}

func sha256Of(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func mapValues[V any](m map[string]V) []V {
	var out []V
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
