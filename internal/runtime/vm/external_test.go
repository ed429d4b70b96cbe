package vm

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// TestExternalRegistryIsReachedWithTheBuildsCredentials: a build names
// kiln's registry and a second, external one that demands a login. The
// external registry gets a tunnel of its own whose host side dials it
// where the reference says (here 127.0.0.1:PORT, plain HTTP, so listed as
// insecure), and BuildKit logs in with the build's memory-only
// credentials: the image lands in both registries. The next build on the
// same builder, without credentials, is refused by the external registry,
// and says so. A third one, with credentials again, copies a file from a
// named local context (--build-context mynamed=DIR), which travels to the
// guest as a tree of its own.
func TestExternalRegistryIsReachedWithTheBuildsCredentials(t *testing.T) {
	r := newRuntime(t)
	const user, pass = "pusher", "kiln-ext-secret-4711"
	ext := testkit.RegistryWithAuth(t, user, pass)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, map[string]string{
		"hello.txt":  "hello, external registry\n",
		"Dockerfile": "FROM scratch\nCOPY hello.txt /\n",
	})
	mk := func(id string, creds map[string]solve.Credentials) runtime.Job {
		j := oneCPUUnderTCG(r, job(id, vol, 512, solve.Request{
			ContextDir:   dir,
			Push:         []string{guestRegistry + "/builds/" + id + ":latest", ext + "/team/app:" + id},
			RegistryAuth: creds,
		}))
		j.Registry = guestRegistry
		j.InsecureRegistries = append(j.InsecureRegistries, ext)
		// On loopback: reached only because it is listed by host:port.
		j.AllowedRegistries = []string{ext}
		return j
	}

	start := time.Now()
	bi, err := r.StartBuilder(ctx(t, 3*time.Minute), mk("ext1", nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bi.Stop(context.Background())
	t.Logf("builder started in %s", time.Since(start).Round(time.Millisecond))

	rec := &testkit.Recorder{}
	start = time.Now()
	res, err := bi.Run(ctx(t, 3*time.Minute), mk("ext1", map[string]solve.Credentials{ext: {Username: user, Password: pass}}), rec)
	if err != nil {
		t.Fatalf("build with credentials: %v\nlogs:\n%s", err, rec.Logs())
	}
	t.Logf("build with credentials pushed to both registries in %s", time.Since(start).Round(time.Millisecond))
	if !testkit.ManifestExists(t, onHost(guestRegistry+"/builds/ext1@"+res.Digest)) {
		t.Errorf("kiln's registry does not serve %s", res.Digest)
	}
	if status, _ := getManifest(t, ext, "team/app", "ext1", "", ""); status != http.StatusUnauthorized {
		t.Errorf("the external registry answered %d without credentials, want 401: it must demand a login", status)
	}
	if status, digest := getManifest(t, ext, "team/app", "ext1", user, pass); status != http.StatusOK || digest != res.Digest {
		t.Errorf("external registry: manifest of team/app:ext1 answered %d with digest %q, want 200 and %s", status, digest, res.Digest)
	}
	if rec.Contains(pass) {
		t.Errorf("the external registry's password appeared in the build's events")
	}

	// Same builder, same shape, no credentials.
	rec2 := &testkit.Recorder{}
	start = time.Now()
	_, err = bi.Run(ctx(t, 3*time.Minute), mk("ext2", nil), rec2)
	t.Logf("build without credentials ended in %s: %v", time.Since(start).Round(time.Millisecond), err)
	if err == nil {
		t.Fatal("the build without credentials pushed to a registry that demands a login")
	}
	if msg := strings.ToLower(err.Error()); !strings.Contains(msg, "unauthorized") && !strings.Contains(msg, "authentication") {
		t.Errorf("error does not say the registry wanted authentication: %v", err)
	}
	if !bi.Reusable() {
		t.Errorf("a push refused by the registry is a build failure; the builder should stay reusable")
	}
	if status, _ := getManifest(t, ext, "team/app", "ext2", user, pass); status != http.StatusNotFound {
		t.Errorf("team/app:ext2 answered %d in the external registry, want 404", status)
	}

	// Same builder, a named local context.
	named := mk("ext3", map[string]solve.Credentials{ext: {Username: user, Password: pass}})
	named.Solve.ContextDir = testkit.ContextDir(t, map[string]string{
		"hello.txt":  "hello, external registry\n",
		"Dockerfile": "FROM scratch\nCOPY hello.txt /\nCOPY --from=mynamed /file /file\n",
	})
	named.Solve.LocalContexts = map[string]string{"mynamed": testkit.ContextDir(t, map[string]string{"file": "from the named context\n"})}
	rec3 := &testkit.Recorder{}
	start = time.Now()
	res3, err := bi.Run(ctx(t, 3*time.Minute), named, rec3)
	if err != nil {
		t.Fatalf("build with a named local context: %v\nlogs:\n%s", err, rec3.Logs())
	}
	t.Logf("build with a named local context took %s", time.Since(start).Round(time.Millisecond))
	img := testkit.FetchImage(t, onHost(guestRegistry+"/builds/ext3:latest"))
	if img.Digest != res3.Digest {
		t.Errorf("build reported %s, kiln's registry holds %s", res3.Digest, img.Digest)
	}
	if got := string(img.Files["/file"]); got != "from the named context\n" {
		t.Errorf("/file from the named context = %q", got)
	}
	if got := string(img.Files["/hello.txt"]); got != "hello, external registry\n" {
		t.Errorf("/hello.txt from the main context = %q", got)
	}

	if err := bi.Stop(ctx(t, time.Minute)); err != nil {
		t.Errorf("Stop: %v", err)
	}
	assertReleased(t, r, vol)
}

// getManifest fetches a manifest from a plain-HTTP registry, with basic
// auth when user is set, and returns the status and the digest it names.
func getManifest(t *testing.T, host, repo, tag, user, pass string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://%s/v2/%s/manifests/%s", host, repo, tag), nil)
	req.Header.Set("Accept", "application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.docker.distribution.manifest.list.v2+json")
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("Docker-Content-Digest")
}
