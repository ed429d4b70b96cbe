package mirror_test

import (
	"context"
	"crypto/rand"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/testkit"
)

func helloImage(t *testing.T, content string) testImage {
	return buildImage(t, "amd64", map[string][]byte{"hello.txt": []byte(content)}, nil)
}

func TestResolveEnsureServeLocallyAndPullSeesMovedTag(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	push := pusher{t: t, base: up.url}
	v1img := helloImage(t, "version one\n")
	push.image("app/hello", "1", v1img)

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	ref := up.host + "/app/hello:1"

	before := up.count()
	p, err := m.Resolve(ctx, ref, false)
	if err != nil {
		t.Fatal(err)
	}
	wantRepo := "mirror/" + strings.ReplaceAll(up.host, ":", "_") + "/app/hello"
	if p.Digest != v1img.digest.String() || p.LocalRepo != wantRepo || p.Upstream != ref || !p.FromUpstream {
		t.Fatalf("Resolve = %+v, want digest %s in %s from upstream", p, v1img.digest, wantRepo)
	}
	if up.count() == before {
		t.Fatal("first resolve did not ask the upstream registry")
	}

	var (
		mu    sync.Mutex
		calls [][2]int64
	)
	err = m.Ensure(ctx, p, func(done, total int64) {
		mu.Lock()
		calls = append(calls, [2]int64{done, total})
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) == 0 {
		t.Fatal("Ensure reported no progress")
	}
	if last := calls[len(calls)-1]; last[0] != v1img.size() || last[1] != v1img.size() {
		t.Errorf("last progress = %d/%d, want %d/%d (config + layer bytes)", last[0], last[1], v1img.size(), v1img.size())
	}

	// The image now pulls from kiln's registry, by digest and by the
	// upstream tag, with every blob.
	token := local.kilnToken(t, auth.ScopeImageRead)
	dir, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), token)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range v1img.blobs() {
		if !layoutHasBlob(dir, b.digest) {
			t.Errorf("pulled image lacks blob %s", b.digest)
		}
	}
	if got, err := local.reg.Resolve(ctx, p.LocalRepo, "1"); err != nil || got != p.Digest {
		t.Fatalf("local tag 1 = %q, %v; want %s", got, err, p.Digest)
	}

	// A second resolve without pull, and a second Ensure, need no network.
	quiet := up.count()
	p2, err := m.Resolve(ctx, ref, false)
	if err != nil || p2.Digest != p.Digest || p2.FromUpstream {
		t.Fatalf("second resolve = %+v, %v; want %s from the local store", p2, err, p.Digest)
	}
	if err := m.Ensure(ctx, p2, nil); err != nil {
		t.Fatal(err)
	}
	if n := up.count() - quiet; n != 0 {
		t.Fatalf("second resolve+ensure sent %d requests upstream, want 0:\n%s", n, up.log())
	}

	// The tag moves upstream. Without pull kiln keeps its pin; pull sees
	// the new digest, and Ensure moves the local tag.
	v2img := helloImage(t, "version two\n")
	push.image("app/hello", "1", v2img)
	if p3, err := m.Resolve(ctx, ref, false); err != nil || p3.Digest != v1img.digest.String() {
		t.Fatalf("resolve without pull after upstream moved = %+v, %v; want the mirrored %s", p3, err, v1img.digest)
	}
	p4, err := m.Resolve(ctx, ref, true)
	if err != nil {
		t.Fatal(err)
	}
	if p4.Digest != v2img.digest.String() {
		t.Fatalf("pull resolve = %s, want the moved tag's %s", p4.Digest, v2img.digest)
	}
	if err := m.Ensure(ctx, p4, nil); err != nil {
		t.Fatal(err)
	}
	if p5, err := m.Resolve(ctx, ref, false); err != nil || p5.Digest != v2img.digest.String() {
		t.Fatalf("resolve after pull+ensure = %+v, %v; want %s", p5, err, v2img.digest)
	}
	// An old pin Ensured later must not move the tag back.
	if err := m.Ensure(ctx, p2, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := local.reg.Resolve(ctx, p.LocalRepo, "1"); got != v2img.digest.String() {
		t.Fatalf("ensuring an old local pin moved tag 1 back to %s", got)
	}
	// The old pin still pulls: builds pinned to it keep working.
	if _, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), token); err != nil {
		t.Fatalf("old pin no longer pullable: %v", err)
	}
}

func TestResolveByDigestNeedsNoNetworkAndLeavesTagsAlone(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	img := helloImage(t, "pinned\n")
	pusher{t: t, base: up.url}.image("app/pinned", "latest", img)

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	ref := up.host + "/app/pinned@" + img.digest.String()
	before := up.count()
	p, err := m.Resolve(ctx, ref, true)
	if err != nil {
		t.Fatal(err)
	}
	if p.Digest != img.digest.String() || up.count() != before {
		t.Fatalf("digest resolve = %+v after %d upstream requests; want the reference's digest and none", p, up.count()-before)
	}
	if err := m.Ensure(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), local.kilnToken(t, auth.ScopeImageRead)); err != nil {
		t.Fatal(err)
	}
	if tags, _ := local.reg.Tags(ctx, p.LocalRepo); len(tags) != 0 {
		t.Errorf("mirroring a digest reference created tags %v", tags)
	}

	// A digest the upstream does not have is reported as such.
	missing := up.host + "/app/pinned@" + digest.FromString("nope").String()
	p, err = m.Resolve(ctx, missing, false)
	if err != nil {
		t.Fatal(err)
	}
	err = m.Ensure(ctx, p, nil)
	if !errors.Is(err, mirror.ErrNotFound) || !strings.Contains(err.Error(), "image not found upstream") {
		t.Fatalf("Ensure of a missing digest: %v; want ErrNotFound saying so", err)
	}
}

func TestNotFoundUpstream(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	pusher{t: t, base: up.url}.image("app/there", "1", helloImage(t, "x\n"))
	m := newMirror(t, mirror.Config{Registry: startKilnRegistry(t).reg})

	for _, ref := range []string{up.host + "/app/missing:1", up.host + "/app/there:nosuchtag"} {
		_, err := m.Resolve(ctx, ref, false)
		if !errors.Is(err, mirror.ErrNotFound) {
			t.Fatalf("Resolve(%s) = %v, want ErrNotFound", ref, err)
		}
		if !strings.Contains(err.Error(), "image not found upstream") || !strings.Contains(err.Error(), ref[:strings.LastIndex(ref, ":")]) {
			t.Errorf("error does not name the image or say it was not found: %v", err)
		}
	}
}

func TestUnknownHostAndUnreachableRegistry(t *testing.T) {
	ctx := testCtx(t)
	m := newMirror(t, mirror.Config{Registry: startKilnRegistry(t).reg})
	_, err := m.Resolve(ctx, "registry.kiln-test.invalid/org/img:1", false)
	if err == nil || !strings.Contains(err.Error(), `registry host "registry.kiln-test.invalid" not found`) {
		t.Fatalf("unknown host: %v", err)
	}

	// A loopback port nobody listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	_, err = m.Resolve(ctx, dead+"/org/img:1", false)
	if err == nil || !strings.Contains(err.Error(), "cannot connect to upstream registry "+dead) {
		t.Fatalf("unreachable registry: %v", err)
	}
}

func TestBasicAuthUpstream(t *testing.T) {
	ctx := testCtx(t)
	const user, pass = "puller", "s3cret-basic-pw"
	up := proxyTo(t, testkit.RegistryWithAuth(t, user, pass))
	img := helloImage(t, "private\n")
	pusher{t: t, base: up.url, user: user, pass: pass}.image("team/private", "v1", img)
	local := startKilnRegistry(t)
	ref := up.host + "/team/private:v1"

	anon := newMirror(t, mirror.Config{Registry: local.reg})
	_, err := anon.Resolve(ctx, ref, false)
	if !errors.Is(err, mirror.ErrUnauthorized) || !strings.Contains(err.Error(), "mirror.credentials") || !strings.Contains(err.Error(), up.host) {
		t.Fatalf("no credentials: %v; want ErrUnauthorized naming the host and mirror.credentials", err)
	}

	wrong := newMirror(t, mirror.Config{Registry: local.reg, Credentials: map[string]mirror.Credentials{up.host: {Username: user, Password: "wrong-pw-123"}}})
	_, err = wrong.Resolve(ctx, ref, false)
	if !errors.Is(err, mirror.ErrUnauthorized) || !strings.Contains(err.Error(), "rejected") {
		t.Fatalf("wrong credentials: %v; want ErrUnauthorized saying they were rejected", err)
	}
	if strings.Contains(err.Error(), "wrong-pw-123") {
		t.Fatalf("error leaks the password: %v", err)
	}

	good := newMirror(t, mirror.Config{Registry: local.reg, Credentials: map[string]mirror.Credentials{up.host: {Username: user, Password: pass}}})
	p, err := good.Resolve(ctx, ref, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := good.Ensure(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	if p.Digest != img.digest.String() {
		t.Fatalf("digest %s, want %s", p.Digest, img.digest)
	}
	if _, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), local.kilnToken(t, auth.ScopeImageRead)); err != nil {
		t.Fatal(err)
	}
}

// TestBearerTokenUpstream uses a second kiln registry as the upstream: it
// challenges with Bearer realm=…,service=…,scope=… and issues tokens at
// its realm the way Docker Hub and ghcr.io do.
func TestBearerTokenUpstream(t *testing.T) {
	ctx := testCtx(t)
	upReg := startKilnRegistry(t)
	img := helloImage(t, "behind a token server\n")
	storeImage(t, upReg.reg, "org/app", "2.0", img)
	pullToken := upReg.kilnToken(t, auth.ScopeImageRead)
	ref := upReg.srv.host + "/org/app:2.0"
	local := startKilnRegistry(t)

	_, err := newMirror(t, mirror.Config{Registry: local.reg}).Resolve(ctx, ref, false)
	if !errors.Is(err, mirror.ErrUnauthorized) || !strings.Contains(err.Error(), `Set credentials for "`+upReg.srv.host+`" in the server config key mirror.credentials`) {
		t.Fatalf("no credentials: %v", err)
	}

	for name, creds := range map[string]mirror.Credentials{
		"password":       {Username: "kiln", Password: pullToken},
		"identity token": {Token: pullToken},
	} {
		t.Run(name, func(t *testing.T) {
			m := newMirror(t, mirror.Config{Registry: local.reg, Credentials: map[string]mirror.Credentials{upReg.srv.host: creds}})
			p, err := m.Resolve(ctx, ref, true)
			if err != nil {
				t.Fatal(err)
			}
			if p.Digest != img.digest.String() {
				t.Fatalf("digest %s, want %s", p.Digest, img.digest)
			}
			if err := m.Ensure(ctx, p, nil); err != nil {
				t.Fatal(err)
			}
		})
	}

	badToken := upReg.kilnToken(t, auth.ScopeImageRead) + "x"
	_, err = newMirror(t, mirror.Config{Registry: local.reg, Credentials: map[string]mirror.Credentials{upReg.srv.host: {Username: "kiln", Password: badToken}}}).Resolve(ctx, ref, true)
	if !errors.Is(err, mirror.ErrUnauthorized) || !strings.Contains(err.Error(), "rejected") || strings.Contains(err.Error(), badToken) {
		t.Fatalf("bad credentials at the token endpoint: %v", err)
	}
}

// TestAnonymousBearerUpstream is a public registry: its token endpoint
// hands out pull tokens to anyone, as Docker Hub does for public images.
func TestAnonymousBearerUpstream(t *testing.T) {
	ctx := testCtx(t)
	upReg := startKilnRegistry(t)
	img := helloImage(t, "public\n")
	storeImage(t, upReg.reg, "library/public", "latest", img)
	public := upReg.kilnToken(t, auth.ScopeImageRead)
	upReg.srv.set(func(c *countingServer) {
		c.rewrite = func(r *http.Request) {
			if r.URL.Path == "/v2/token" && r.Header.Get("Authorization") == "" {
				r.SetBasicAuth("anonymous", public)
			}
		}
	})
	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	p, err := m.Resolve(ctx, upReg.srv.host+"/library/public", false)
	if err != nil {
		t.Fatal(err)
	}
	if p.Upstream != upReg.srv.host+"/library/public:latest" || p.Digest != img.digest.String() {
		t.Fatalf("Resolve = %+v", p)
	}
	if err := m.Ensure(ctx, p, nil); err != nil {
		t.Fatal(err)
	}
	if n := upReg.srv.countMatching("GET /v2/token"); n != 1 {
		t.Errorf("fetched %d tokens for one repository, want 1 (cached):\n%s", n, upReg.srv.log())
	}
}

func TestIndexMirrorsConfiguredPlatformOnly(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	push := pusher{t: t, base: up.url}
	amd := buildImage(t, "amd64", map[string][]byte{"arch.txt": []byte("amd64\n")}, nil)
	arm := buildImage(t, "arm64", map[string][]byte{"arch.txt": []byte("arm64\n")}, nil)
	att := buildImage(t, "unknown", map[string][]byte{"sbom.json": []byte("{}")}, nil)
	for _, img := range []testImage{amd, arm, att} {
		push.image("multi/app", img.digest.String(), img)
	}
	index := buildIndex([]testImage{amd, arm}, &att)
	push.manifest("multi/app", "3", v1.MediaTypeImageIndex, index)

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg, Platforms: []string{"linux/x86_64"}})
	p, err := m.Resolve(ctx, up.host+"/multi/app:3", false)
	if err != nil {
		t.Fatal(err)
	}
	if p.Digest != digest.FromBytes(index).String() {
		t.Fatalf("pinned %s, want the index digest %s", p.Digest, digest.FromBytes(index))
	}
	var total int64
	if err := m.Ensure(ctx, p, func(_, tot int64) { total = tot }); err != nil {
		t.Fatal(err)
	}
	if total != amd.size() {
		t.Errorf("downloaded %d bytes, want only the amd64 image's %d", total, amd.size())
	}
	has := func(d digest.Digest) bool {
		ok, err := local.reg.HasBlob(ctx, p.LocalRepo, d.String())
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !has(amd.layers[0].digest) || has(arm.layers[0].digest) || has(att.layers[0].digest) {
		t.Errorf("blobs mirrored: amd64 %v arm64 %v attestation %v; want only amd64", has(amd.layers[0].digest), has(arm.layers[0].digest), has(att.layers[0].digest))
	}
	_, body, _, err := local.reg.Manifest(ctx, p.LocalRepo, p.Digest)
	if err != nil || string(body) != string(index) {
		t.Fatalf("stored index differs from upstream's (err %v)", err)
	}
	// A client on this (amd64) host pulls the index and gets its platform.
	dir, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), local.kilnToken(t, auth.ScopeImageRead))
	if err != nil {
		t.Fatal(err)
	}
	if !layoutHasBlob(dir, amd.layers[0].digest) {
		t.Error("pulled index did not yield the amd64 layer")
	}

	// A build for arm64 as well copies the arm64 child too, and only it.
	total = -1
	if err := m.EnsureFor(ctx, p, []string{"linux/arm64"}, func(_, tot int64) { total = tot }); err != nil {
		t.Fatal(err)
	}
	if total != arm.size() || !has(arm.layers[0].digest) || has(att.layers[0].digest) {
		t.Errorf("an arm64 build's ensure downloaded %d bytes (want the arm64 image's %d); arm64 layer %v, attestation %v", total, arm.size(), has(arm.layers[0].digest), has(att.layers[0].digest))
	}

	other := newMirror(t, mirror.Config{Registry: startKilnRegistry(t).reg, Platforms: []string{"linux/riscv64"}})
	err = other.Ensure(ctx, p, nil)
	if err == nil || !strings.Contains(err.Error(), "linux/riscv64") || !strings.Contains(err.Error(), "linux/amd64, linux/arm64") {
		t.Fatalf("index without the wanted platform: %v", err)
	}
}

func TestDigestMismatchIsRefusedAndLeavesNothing(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	img := helloImage(t, "tampered\n")
	pusher{t: t, base: up.url}.image("app/tampered", "1", img)
	layerPath := "/blobs/" + img.layers[0].digest.String()
	up.set(func(c *countingServer) {
		c.corrupt = func(r *http.Request) bool { return strings.HasSuffix(r.URL.Path, layerPath) }
	})

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	p, err := m.Resolve(ctx, up.host+"/app/tampered:1", false)
	if err != nil {
		t.Fatal(err)
	}
	err = m.Ensure(ctx, p, nil)
	if !errors.Is(err, mirror.ErrDigestMismatch) || !strings.Contains(err.Error(), img.layers[0].digest.String()) {
		t.Fatalf("corrupted layer: %v; want ErrDigestMismatch naming the blob", err)
	}
	if n := up.countMatching(layerPath); n != 1 {
		t.Errorf("corrupted layer fetched %d times, want 1 (a mismatch is not retried)", n)
	}
	if ok, _ := local.reg.HasBlob(ctx, p.LocalRepo, img.layers[0].digest.String()); ok {
		t.Error("corrupted layer was stored")
	}
	if ok, _ := local.reg.HasManifest(ctx, p.LocalRepo, p.Digest); ok {
		t.Error("manifest stored although its layer failed")
	}
	if left := local.leftoverUploads(t, p.LocalRepo); len(left) != 0 {
		t.Errorf("upload sessions left behind: %v", left)
	}
	if _, err := local.reg.Resolve(ctx, p.LocalRepo, "1"); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("tag set after a failed mirror: %v", err)
	}

	// A manifest that does not match the pinned digest is refused too.
	up.set(func(c *countingServer) {
		c.corrupt = func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/manifests/") }
	})
	err = newMirror(t, mirror.Config{Registry: local.reg}).Ensure(ctx, p, nil)
	if !errors.Is(err, mirror.ErrDigestMismatch) {
		t.Fatalf("corrupted manifest: %v; want ErrDigestMismatch", err)
	}
}

func TestConcurrentEnsureCopiesOnce(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	big := make([]byte, 6<<20) // incompressible, several progress steps
	rand.Read(big)
	img := buildImage(t, "amd64", map[string][]byte{"big.bin": big}, nil)
	pusher{t: t, base: up.url}.image("app/big", "1", img)
	// Hold blob downloads back so every caller joins the running copy.
	up.set(func(c *countingServer) {
		c.delay = func(r *http.Request) time.Duration {
			if strings.Contains(r.URL.Path, "/blobs/") {
				return 300 * time.Millisecond
			}
			return 0
		}
	})

	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	p, err := m.Resolve(ctx, up.host+"/app/big:1", false)
	if err != nil {
		t.Fatal(err)
	}

	const callers = 5
	var wg sync.WaitGroup
	errs := make([]error, callers)
	last := make([][2]int64, callers)
	for i := range callers {
		wg.Go(func() {
			errs[i] = m.Ensure(ctx, p, func(done, total int64) { last[i] = [2]int64{done, total} })
		})
	}
	// One more caller gives up early; the others must not notice.
	quitter, quit := context.WithTimeout(ctx, 100*time.Millisecond)
	defer quit()
	quitErr := m.Ensure(quitter, p, nil)
	wg.Wait()

	if !errors.Is(quitErr, context.DeadlineExceeded) {
		t.Errorf("caller that gave up: %v, want its deadline", quitErr)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("caller %d: %v", i, err)
		}
		if last[i][0] != img.size() || last[i][1] != img.size() {
			t.Errorf("caller %d last progress %v, want %d/%d", i, last[i], img.size(), img.size())
		}
	}
	for _, b := range img.blobs() {
		if n := up.countMatching("GET /v2/app/big/blobs/" + b.digest.String()); n != 1 {
			t.Errorf("blob %s downloaded %d times, want 1", b.digest, n)
		}
	}
	if _, err := skopeoPull(t, "docker://"+p.LocalRef(local.srv.host), local.kilnToken(t, auth.ScopeImageRead)); err != nil {
		t.Fatal(err)
	}
}

func TestCancelStopsCopyAndCleansUp(t *testing.T) {
	up := proxyTo(t, testkit.Registry(t))
	big := make([]byte, 2<<20)
	rand.Read(big)
	img := buildImage(t, "amd64", map[string][]byte{"big.bin": big}, nil)
	pusher{t: t, base: up.url}.image("app/slow", "1", img)
	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	p, err := m.Resolve(testCtx(t), up.host+"/app/slow:1", false)
	if err != nil {
		t.Fatal(err)
	}

	// The layer trickles: the copy is mid-blob when the caller cancels.
	slow := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, up.url+r.URL.Path, nil)
		req.Header = r.Header.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		buf := make([]byte, 32<<10)
		for {
			n, err := resp.Body.Read(buf)
			w.Write(buf[:n])
			w.(http.Flusher).Flush()
			if err != nil {
				return
			}
			select {
			case <-time.After(50 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
	}))
	m = newMirror(t, mirror.Config{Registry: local.reg, Endpoints: map[string]string{up.host: slow.url}})

	ctx, cancel := context.WithCancel(context.Background())
	progressed := make(chan struct{}, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- m.Ensure(ctx, p, func(done, _ int64) {
			if done > 0 {
				select {
				case progressed <- struct{}{}:
				default:
				}
			}
		})
	}()
	select {
	case <-progressed:
	case err := <-errc:
		t.Fatalf("Ensure finished before it could be canceled: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no progress within 30s")
	}
	cancel()
	start := time.Now()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("canceled Ensure: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Ensure did not return within 10s of cancel")
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("cancel took %s", d)
	}
	if left := local.leftoverUploads(t, p.LocalRepo); len(left) != 0 {
		t.Errorf("upload sessions left after cancel: %v", left)
	}
	if ok, _ := local.reg.HasManifest(context.Background(), p.LocalRepo, p.Digest); ok {
		t.Error("manifest stored by a canceled copy")
	}

	// Nothing is stuck: the next Ensure starts afresh and completes.
	if err := newMirror(t, mirror.Config{Registry: local.reg}).Ensure(testCtx(t), p, nil); err != nil {
		t.Fatal(err)
	}
}

// TestSharedBlobsAreLinkedNotDownloaded: a second image reusing a layer
// another mirrored repository already holds downloads only what is new.
func TestSharedBlobsAreLinkedNotDownloaded(t *testing.T) {
	ctx := testCtx(t)
	up := proxyTo(t, testkit.Registry(t))
	push := pusher{t: t, base: up.url}
	img := helloImage(t, "shared base\n")
	push.image("one/app", "1", img)
	push.image("two/app", "1", img)
	local := startKilnRegistry(t)
	m := newMirror(t, mirror.Config{Registry: local.reg})
	for _, repo := range []string{"one/app", "two/app"} {
		p, err := m.Resolve(ctx, up.host+"/"+repo+":1", false)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Ensure(ctx, p, nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := up.countMatching("GET /v2/two/app/blobs/"); n != 0 {
		t.Errorf("second repository downloaded %d blobs the store already held", n)
	}
	if _, err := skopeoPull(t, "docker://"+local.srv.host+"/mirror/"+strings.ReplaceAll(up.host, ":", "_")+"/two/app:1", local.kilnToken(t, auth.ScopeImageRead)); err != nil {
		t.Fatal(err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	reg := startKilnRegistry(t).reg
	for name, cfg := range map[string]mirror.Config{
		"no registry":        {},
		"token and password": {Registry: reg, Credentials: map[string]mirror.Credentials{"ghcr.io": {Username: "u", Password: "p", Token: "t"}}},
		"user without pass":  {Registry: reg, Credentials: map[string]mirror.Credentials{"ghcr.io": {Username: "u"}}},
		"host with path":     {Registry: reg, Credentials: map[string]mirror.Credentials{"ghcr.io/org": {Username: "u", Password: "p"}}},
		"bad platform":       {Registry: reg, Platforms: []string{"amd64"}},
		"bad endpoint":       {Registry: reg, Endpoints: map[string]string{"docker.io": "mirror.example.com"}},
	} {
		if _, err := mirror.New(cfg); err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
		} else if strings.Contains(err.Error(), `"p"`) || strings.Contains(err.Error(), `"t"`) {
			t.Errorf("%s: error leaks a secret: %v", name, err)
		}
	}
}
