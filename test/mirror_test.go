package test

import (
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/kiln-build/kiln/internal/testkit"
)

// copyImage copies an image between registries with skopeo.
func copyImage(t *testing.T, srcCreds, src, destCreds, dest string) {
	t.Helper()
	args := []string{"copy", "--src-tls-verify=false", "--dest-tls-verify=false"}
	if srcCreds != "" {
		args = append(args, "--src-creds", srcCreds)
	}
	if destCreds != "" {
		args = append(args, "--dest-creds", destCreds)
	}
	if out, err := exec.Command("skopeo", append(args, "docker://"+src, "docker://"+dest)...).CombinedOutput(); err != nil {
		t.Fatalf("skopeo copy %s %s: %v\n%s", src, dest, err, out)
	}
}

// Base images from another registry are pulled into kiln's mirror the
// first time, served from kiln after that, pinned per build, and
// re-resolved by pull builds. The "upstream" is a second registry on
// loopback standing in for docker.io.
func TestBaseImagesFromAnotherRegistry(t *testing.T) {
	upstream := testkit.RegistryWithAuth(t, "up-user", "up-pass")
	s := startServer(t, withArgs(
		"--mirror-endpoints", fmt.Sprintf(`{"docker.io":"http://%s"}`, upstream),
		"--mirror-credentials", `{"docker.io":{"username":"up-user","password":"up-pass"}}`))
	base := s.base()
	copyImage(t, "kiln:"+s.admin, base, "up-user:up-pass", upstream+"/library/busybox:1")

	// FROM busybox:1 means docker.io/library/busybox:1, as with docker.
	df := "FROM busybox:1\nRUN echo from-mirror > /m\n"
	first := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": df}}))
	log := s.logText(s.admin, first.Id)
	if !strings.Contains(log, "busybox:1@sha256:") || !strings.Contains(log, "kiln's mirror") {
		t.Errorf("build log does not show the pinned, mirrored base:\n%s", log)
	}
	if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/mirror/docker.io/library/busybox:1") {
		t.Errorf("the base is not in kiln's mirror")
	}

	// The upstream tag moves; a normal build keeps using kiln's copy
	// (its input hash is unchanged, so it is even deduplicated)...
	copyImage(t, "kiln:"+s.admin, s.addr+"/builds/"+first.Id+":latest", "up-user:up-pass", upstream+"/library/busybox:1")
	again := s.build(s.admin, submission{files: map[string]string{"Dockerfile": df}})
	if again.DedupOf == nil || *again.DedupOf != first.Id {
		t.Errorf("rebuild after the upstream tag moved did not use kiln's pinned copy (dedup_of %v)", again.DedupOf)
	}
	// ...while a pull build re-resolves upstream and builds on the new digest.
	pulled := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": df},
		fields: [][2]string{{"pull", "true"}}}))
	if *pulled.ImageDigest == *first.ImageDigest {
		t.Errorf("pull build produced the same image as before the upstream tag moved")
	}

	// Bad bases fail the submission with a clear message, recording nothing.
	code, body := s.submit(s.admin, submission{files: map[string]string{"Dockerfile": "FROM busybox:nope\n"}})
	if code != http.StatusBadRequest || !strings.Contains(string(body), "not found") {
		t.Errorf("missing upstream tag: %d %s", code, body)
	}

	// Nobody but kiln (or build:admin) may write the mirror.
	w := s.token("mallory", "m", "image:read", "image:write")
	out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
		"--src-creds", "kiln:"+s.admin, "--dest-creds", "kiln:"+w,
		"docker://"+base, "docker://"+s.addr+"/mirror/docker.io/library/busybox:1").CombinedOutput()
	if err == nil {
		t.Errorf("image:write token pushed into the mirror: %s", out)
	}
	// Not even the admin token writes it over HTTP: only kiln's mirror does.
	if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
		"--src-creds", "kiln:"+s.admin, "--dest-creds", "kiln:"+s.admin,
		"docker://"+base, "docker://"+s.addr+"/mirror/docker.io/library/busybox:1").CombinedOutput(); err == nil {
		t.Errorf("the admin token pushed into the mirror: %s", out)
	}

	// B1: a tenant builds a poisoned image, then resubmits the identical
	// build (answered by dedup) naming the mirror's busybox:1. That used
	// to link the poison under mirror/, where every tenant's FROM
	// busybox:1 would pin it.
	mirrored := inspectDigest(t, s, "mirror/docker.io/library/busybox:1")
	evil := s.token("eve", "tenant-e", "build:read", "build:write")
	poison := submission{files: map[string]string{"Dockerfile": "FROM " + base + "\nRUN echo POISONED > /etc/motd\n"}}
	mustSucceed(t, s, evil, s.build(evil, poison))
	poison.fields = [][2]string{{"tags", "mirror/docker.io/library/busybox:1"}}
	if code, body := s.submit(evil, poison); code != http.StatusBadRequest {
		t.Errorf("tagging into the mirror: %d %s", code, body)
	}
	if now := inspectDigest(t, s, "mirror/docker.io/library/busybox:1"); now != mirrored {
		t.Errorf("mirror/docker.io/library/busybox:1 moved from %s to %s", mirrored, now)
	}
}

// inspectDigest is the digest name points at in kiln's registry.
func inspectDigest(t *testing.T, s *server, name string) string {
	t.Helper()
	out, err := exec.Command("skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+s.admin,
		"docker://"+s.addr+"/"+name).Output()
	if err != nil {
		t.Fatalf("skopeo inspect %s: %v", name, err)
	}
	return digest.FromBytes(out).String()
}

// A "# syntax=" frontend is a base image like any other: pinned at
// submission through kiln's mirror, part of the input hash, and run from
// kiln's registry by digest (BuildKit never reaches the upstream itself,
// here a second registry standing in for docker.io).
func TestSyntaxFrontendComesThroughTheMirror(t *testing.T) {
	upstream := testkit.Registry(t)
	fe := testkit.FrontendImage(t)
	fe.Push(t, testkit.PlainRegistry{Host: upstream}, "docker/dockerfile", "1")
	s := startServer(t, withArgs("--mirror-endpoints", fmt.Sprintf(`{"docker.io":"http://%s"}`, upstream)))
	base := s.base()
	tok := s.token("alice", "tenant-a", "build:read", "build:write")
	df := map[string]string{"Dockerfile": "# syntax=docker/dockerfile:1\nFROM " + base + "\nRUN echo via-frontend > /f\n"}
	first := mustSucceed(t, s, tok, s.build(tok, submission{files: df}))
	log := s.logText(tok, first.Id)
	if !strings.Contains(log, "docker/dockerfile:1@"+fe.Digest) {
		t.Errorf("the build log does not show the pinned frontend %s:\n%s", fe.Digest, log)
	}
	if !strings.Contains(log, "mirror/docker.io/docker/dockerfile@"+fe.Digest) {
		t.Errorf("the frontend was not run from kiln's mirror:\n%s", log)
	}
	// The pin holds while the upstream tag moves: an identical build is
	// answered from the first; a pull build runs the new frontend.
	v2 := fe.Variant(t, "v2")
	v2.Push(t, testkit.PlainRegistry{Host: upstream}, "docker/dockerfile", "1")
	if again := s.build(tok, submission{files: df}); again.DedupOf == nil || *again.DedupOf != first.Id {
		t.Errorf("an identical build after the upstream tag moved was not answered by the first (dedup_of %v)", again.DedupOf)
	}
	pulled := mustSucceed(t, s, tok, s.build(tok, submission{files: df, fields: [][2]string{{"pull", "true"}}}))
	if log := s.logText(tok, pulled.Id); !strings.Contains(log, "docker/dockerfile:1@"+v2.Digest) {
		t.Errorf("the pull build did not pin the new frontend %s:\n%s", v2.Digest, log)
	}
}
