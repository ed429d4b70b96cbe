package mirror_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/runtime/process"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// TestBuildKitBuildsFromMirroredBase proves the integration the build
// service relies on: a Dockerfile saying FROM node:22 (and FROM
// docker.io/library/node:22) is served from kiln's registry through one
// named-context override, digest-pinned, also in pull mode, and BuildKit
// never contacts Docker Hub or the upstream.
func TestBuildKitBuildsFromMirroredBase(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("runs a real buildkitd, which needs root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	// The upstream stands in for Docker Hub: kiln reaches "docker.io"
	// through Endpoints, BuildKit is never told about it.
	hub := proxyTo(t, testkit.Registry(t))
	busybox, err := os.ReadFile(filepath.Join(testkit.BusyboxDir(t), "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	base := buildImage(t, "amd64", map[string][]byte{
		"bin/busybox":   busybox,
		"etc/greeting":  []byte("hello from the mirrored base\n"),
		"etc/os-marker": []byte("kiln-mirror-test\n"),
	}, map[string]string{"bin/sh": "busybox"})
	pusher{t: t, base: hub.url}.image("library/node", "22", base)

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg, Endpoints: map[string]string{"docker.io": hub.url}})
	p, err := m.Resolve(ctx, "node:22", false)
	if err != nil {
		t.Fatal(err)
	}
	if p.Upstream != "docker.io/library/node:22" || p.LocalRepo != "mirror/docker.io/library/node" || p.Digest != base.digest.String() || p.ContextName() != "node:22" {
		t.Fatalf("Resolve(node:22) = %+v, ContextName %q", p, p.ContextName())
	}
	if err := m.Ensure(ctx, p, nil); err != nil {
		t.Fatal(err)
	}

	dest := testkit.Registry(t)
	daemon := startBuildkitd(t, ctx, local.srv.host, dest)

	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{
		"Dockerfile": "FROM docker.io/library/node:22 AS first\n" +
			"RUN [\"/bin/busybox\", \"cp\", \"/etc/greeting\", \"/first.txt\"]\n" +
			"FROM node:22\n" +
			"COPY --from=first /first.txt /first.txt\n" +
			"RUN /bin/busybox cat /etc/greeting > /second.txt\n",
	})
	readToken := local.kilnToken(t, auth.ScopeImageRead)
	req := solve.Request{
		ContextDir:    dir,
		Push:          []string{dest + "/result/app:1"},
		NamedContexts: map[string]string{p.ContextName(): "docker-image://" + p.LocalRef(local.srv.host)},
		RegistryAuth:  map[string]solve.Credentials{local.srv.host: {Username: "kiln", Password: readToken}},
		Pull:          true, // a --pull build re-resolves the named context: still the pinned digest
	}
	hubBefore := hub.count()
	res, err := solve.Run(ctx, daemon.Client(), req, nil)
	if err != nil {
		t.Fatalf("build with the mirrored base: %v\nbuildkitd:\n%s", err, daemon.StderrTail())
	}
	if n := hub.count() - hubBefore; n != 0 {
		t.Errorf("the build sent %d requests to the upstream, want 0:\n%s", n, hub.log())
	}
	if local.srv.countMatching("/v2/"+p.LocalRepo+"/manifests/"+p.Digest) == 0 {
		t.Errorf("BuildKit never fetched the pinned manifest from kiln's registry:\n%s", local.srv.log())
	}
	img := testkit.FetchImage(t, dest+"/result/app@"+res.Digest)
	for path, want := range map[string]string{
		"/first.txt":     "hello from the mirrored base\n",
		"/second.txt":    "hello from the mirrored base\n",
		"/etc/os-marker": "kiln-mirror-test\n",
	} {
		if got := string(img.Files[path]); got != want {
			t.Errorf("%s = %q, want %q", path, got, want)
		}
	}

	// The control: without the override BuildKit goes to Docker Hub,
	// which this machine cannot reach, so the override is what served
	// the base above.
	req.NamedContexts = nil
	_, err = solve.Run(ctx, daemon.Client(), req, nil)
	if err == nil || !strings.Contains(err.Error(), "docker.io") {
		t.Fatalf("build without the named context: %v; want a failure reaching docker.io", err)
	}
	t.Logf("without the override: %v", err)

	// BuildKit looks the familiar name up, not the normalized one: an
	// override keyed docker.io/library/node:22 is ignored.
	req.NamedContexts = map[string]string{p.Upstream: "docker-image://" + p.LocalRef(local.srv.host)}
	if _, err = solve.Run(ctx, daemon.Client(), req, nil); err == nil || !strings.Contains(err.Error(), "registry-1.docker.io") {
		t.Fatalf("build with the override keyed %q: %v; want BuildKit to ignore it and fail reaching Docker Hub", p.Upstream, err)
	}
}

func startBuildkitd(t *testing.T, ctx context.Context, insecure ...string) *process.Daemon {
	t.Helper()
	runc, err := exec.LookPath("runc")
	if err != nil {
		runc = "/usr/sbin/runc"
	}
	// The socket path must stay under the unix socket limit.
	dir, err := os.MkdirTemp("", "kmt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state := filepath.Join(dir, "d")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := process.StartBuildkitd(ctx, process.DaemonConfig{
		Binary:             testkit.Buildkitd(t),
		Root:               filepath.Join(dir, "root"),
		Dir:                state,
		Runc:               runc,
		InsecureRegistries: insecure,
		CgroupParent:       fmt.Sprintf("kiln-mirror-test-%d", os.Getpid()),
		Logger:             quietLogger(),
	})
	if err != nil {
		t.Fatalf("start buildkitd: %v", err)
	}
	t.Cleanup(func() { d.Stop(context.Background()) })
	return d
}
