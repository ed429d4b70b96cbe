package solve_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/buildkit/client"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime/process"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// One buildkitd and one registry serve every test in this package: starting
// them per test would dominate the run time.
var env struct {
	client   *client.Client
	registry string
}

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "solve tests run a real buildkitd and need root")
		return 1
	}
	bin, err := testkit.BuildkitdPath()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	runc, err := exec.LookPath("runc")
	if err != nil {
		runc = "/usr/sbin/runc"
	}
	tmp, err := os.MkdirTemp("", "kiln-solve-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)

	reg, stopRegistry, err := testkit.StartRegistry(filepath.Join(tmp, "registry"), testkit.RegistryOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer stopRegistry()
	env.registry = reg

	dir := filepath.Join(tmp, "d")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := process.StartBuildkitd(ctx, process.DaemonConfig{
		Binary:       bin,
		Root:         filepath.Join(tmp, "root"),
		Dir:          dir,
		Runc:         runc,
		CgroupParent: fmt.Sprintf("kiln-solve-test-%d", os.Getpid()),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start buildkitd:", err)
		return 1
	}
	defer d.Stop(context.Background())
	env.client = d.Client()
	return m.Run()
}

var (
	baseOnce sync.Once
	baseRef  string
	baseErr  error
)

// busyboxBase pushes the busybox base image once and returns its reference.
func busyboxBase(t *testing.T) string {
	t.Helper()
	baseOnce.Do(func() {
		ref := env.registry + "/base/busybox:latest"
		_, baseErr = solve.Run(testCtx(t), env.client, solve.Request{
			ContextDir: testkit.BusyboxDir(t),
			Push:       []string{ref},
		}, nil)
		baseRef = ref
	})
	if baseErr != nil {
		t.Fatalf("build busybox base: %v", baseErr)
	}
	return baseRef
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// contextDir writes files into a fresh build context.
func TestScratchBuildPushesToEveryNameAndReportsDigest(t *testing.T) {
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY hello.txt /hello.txt\n",
		"hello.txt":  "hello from kiln\n",
	})
	rec := &testkit.Recorder{}
	names := []string{env.registry + "/builds/scratch:one", env.registry + "/app/scratch:latest"}
	res, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: names}, rec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.Digest, "sha256:") {
		t.Fatalf("digest = %q, want sha256:…", res.Digest)
	}
	for _, name := range names {
		img := testkit.FetchImage(t, name)
		if img.Digest != res.Digest {
			t.Errorf("%s resolves to %s, build reported %s", name, img.Digest, res.Digest)
		}
		if got := string(img.Files["/hello.txt"]); got != "hello from kiln\n" {
			t.Errorf("%s: /hello.txt = %q", name, got)
		}
	}
	if !testkit.ManifestExists(t, env.registry+"/builds/scratch@"+res.Digest) {
		t.Errorf("registry does not serve the reported digest %s", res.Digest)
	}
	if len(rec.Find(progress.VertexCompleted, "COPY hello.txt")) != 1 {
		t.Errorf("want exactly one completed event for the COPY step, got events: %+v", rec.Events())
	}
	if res.StepsTotal == 0 {
		t.Errorf("StepsTotal = 0")
	}
}

func TestRebuildCountsCachedStepsAndEmitsEachOnce(t *testing.T) {
	base := busyboxBase(t)
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM " + base + "\nRUN echo first-run > /a\nRUN echo second-run > /b\n",
	})
	req := solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/rebuild:latest"}}
	cold := &testkit.Recorder{}
	res1, err := solve.Run(testCtx(t), env.client, req, cold)
	if err != nil {
		t.Fatal(err)
	}
	warm := &testkit.Recorder{}
	res2, err := solve.Run(testCtx(t), env.client, req, warm)
	if err != nil {
		t.Fatal(err)
	}
	if res2.Digest != res1.Digest {
		t.Errorf("identical rebuild changed digest: %s → %s", res1.Digest, res2.Digest)
	}
	if res2.StepsCached < 2 || res2.StepsCached > res2.StepsTotal {
		t.Errorf("warm build: StepsCached=%d StepsTotal=%d, want both RUN steps cached", res2.StepsCached, res2.StepsTotal)
	}
	if len(warm.Find(progress.VertexCached, "echo second-run")) != 1 {
		t.Errorf("want one cached event for the second RUN on rebuild")
	}
	if n := len(cold.Find(progress.VertexStarted, "echo first-run")); n != 1 {
		t.Errorf("cold build: %d started events for the first RUN, want 1 (deduped)", n)
	}
	if len(cold.Find(progress.VertexCached, "echo first-run")) != 0 {
		t.Errorf("cold build must not report the first RUN as cached")
	}

	noCache := &testkit.Recorder{}
	req.NoCache = true
	if _, err := solve.Run(testCtx(t), env.client, req, noCache); err != nil {
		t.Fatal(err)
	}
	if len(noCache.Find(progress.VertexCached, "echo first-run")) != 0 || len(noCache.Find(progress.VertexCompleted, "echo first-run")) != 1 {
		t.Errorf("NoCache build reused the RUN step from cache")
	}
}

func TestSecretReachesRunButNotImageOrEvents(t *testing.T) {
	base := busyboxBase(t)
	secret := "kiln-s3cret-value-8f2a"
	sum := sha256.Sum256([]byte(secret))
	dir := testkit.ContextDir(t, map[string]string{
		// The step prints the secret on purpose: it must be masked in events.
		"Dockerfile": "FROM " + base + "\n" +
			"RUN --mount=type=secret,id=s,required=true sha256sum /run/secrets/s | cut -d' ' -f1 > /sum && echo \"leak: $(cat /run/secrets/s)\"\n",
	})
	rec := &testkit.Recorder{}
	ref := env.registry + "/test/secret:latest"
	_, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: dir,
		Push:       []string{ref},
		Secrets:    map[string][]byte{"s": []byte(secret)},
	}, rec)
	if err != nil {
		t.Fatal(err)
	}
	img := testkit.FetchImage(t, ref)
	if got := strings.TrimSpace(string(img.Files["/sum"])); got != hex.EncodeToString(sum[:]) {
		t.Errorf("RUN saw a different secret: sha256 %q", got)
	}
	if img.ContainsBytes([]byte(secret)) {
		t.Errorf("secret value is in the pushed image")
	}
	if rec.Contains(secret) {
		t.Errorf("secret value appears in progress events")
	}
	if !strings.Contains(rec.Logs(), "leak: ****") {
		t.Errorf("expected the printed secret to be masked in logs, logs:\n%s", rec.Logs())
	}

	// Without the secret, BuildKit's own error must come back. (NoCache: the
	// secret is not part of the step's cache key.)
	_, err = solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{ref}, NoCache: true}, nil)
	if err == nil || !strings.Contains(err.Error(), "secret s") {
		t.Errorf("missing secret: err = %v, want BuildKit's 'secret s not found'", err)
	}
}

func TestBuildArgsAndTargetSelectStage(t *testing.T) {
	base := busyboxBase(t)
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM " + base + " AS greet\nARG GREETING=default\nRUN echo \"$GREETING\" > /msg\n" +
			"FROM " + base + " AS other\nRUN echo other-stage > /msg\n",
	})
	ref := env.registry + "/test/args:latest"
	if _, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: dir,
		Push:       []string{ref},
		Target:     "greet",
		BuildArgs:  map[string]string{"GREETING": "hello-arg"},
	}, nil); err != nil {
		t.Fatal(err)
	}
	if got := string(testkit.FetchImage(t, ref).Files["/msg"]); got != "hello-arg\n" {
		t.Errorf("target greet with GREETING: /msg = %q", got)
	}
	if _, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{ref}}, nil); err != nil {
		t.Fatal(err)
	}
	if got := string(testkit.FetchImage(t, ref).Files["/msg"]); got != "other-stage\n" {
		t.Errorf("default target: /msg = %q, want the last stage", got)
	}

	_, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{ref}, Target: "nope"}, nil)
	t.Logf("unknown target: %v", err)
	if err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown target: err = %v, want BuildKit's message naming the target", err)
	}
}

func TestDockerignoreExcludesFilesAndSeparateDockerfileDir(t *testing.T) {
	ctxDir := testkit.ContextDir(t, map[string]string{
		"keep.txt":      "kept\n",
		"private.env":   "TOKEN=should-not-ship\n",
		"sub/also.txt":  "kept too\n",
		".dockerignore": "private.env\n",
	})
	dfDir := testkit.ContextDir(t, map[string]string{
		"build/My.Dockerfile": "FROM scratch\nCOPY . /ctx/\n",
	})
	ref := env.registry + "/test/ignore:latest"
	if _, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir:     ctxDir,
		DockerfileDir:  dfDir,
		DockerfileName: "build/My.Dockerfile",
		Push:           []string{ref},
	}, nil); err != nil {
		t.Fatal(err)
	}
	img := testkit.FetchImage(t, ref)
	if _, ok := img.Files["/ctx/private.env"]; ok {
		t.Errorf(".dockerignore'd file was copied into the image")
	}
	if string(img.Files["/ctx/keep.txt"]) != "kept\n" || string(img.Files["/ctx/sub/also.txt"]) != "kept too\n" {
		t.Errorf("context files missing from image: %v", keys(img.Files))
	}
}

func TestDockerfileSyntaxErrorReturnsBuildKitMessage(t *testing.T) {
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\nFORM scratch\n"})
	rec := &testkit.Recorder{}
	_, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/bad:latest"}}, rec)
	if err == nil {
		t.Fatal("syntax error built successfully")
	}
	t.Logf("syntax error: %v", err)
	if !strings.Contains(err.Error(), "unknown instruction: FORM") {
		t.Errorf("err = %v, want BuildKit's 'unknown instruction: FORM'", err)
	}
}

func TestFailingRunReportsVertexError(t *testing.T) {
	base := busyboxBase(t)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN echo about-to-fail && exit 3\n"})
	rec := &testkit.Recorder{}
	_, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/fail:latest"}}, rec)
	if err == nil || !strings.Contains(err.Error(), "exit code: 3") {
		t.Fatalf("err = %v, want the RUN's exit code", err)
	}
	errored := rec.Find(progress.VertexErrored, "about-to-fail")
	if len(errored) != 1 || errored[0].Error == "" {
		t.Errorf("want one errored event with the vertex error, got %+v", errored)
	}
	logs := rec.Find(progress.Log, "about-to-fail")
	if len(logs) == 0 || !strings.Contains(logs[0].Data, "about-to-fail") || logs[0].Stream != 1 {
		t.Errorf("want the step's stdout as a log event, got %+v", logs)
	}
	// The error recaps as buildx does: the failing step with its last
	// output, then the Dockerfile line it came from, then the error once.
	msg := err.Error()
	for _, want := range []string{" > [2/2] RUN echo about-to-fail && exit 3:\n", "about-to-fail\n------\n", "Dockerfile:2\n", ">>> RUN echo about-to-fail && exit 3"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Count(msg, "exit code: 3") != 1 {
		t.Errorf("the error says its cause %d times:\n%s", strings.Count(msg, "exit code: 3"), msg)
	}
}

// The docker build knobs reach BuildKit: labels into the image config,
// annotations onto the manifest, and RUN's hosts, /dev/shm and ulimits.
func TestLabelsAnnotationsHostsShmAndUlimits(t *testing.T) {
	base := busyboxBase(t)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
		"RUN grep db.internal /etc/hosts && df -k /dev/shm | tail -1 && echo nofile=$(ulimit -n)\n"})
	rec := &testkit.Recorder{}
	ref := env.registry + "/test/knobs:latest"
	_, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{ref},
		Labels: map[string]string{"org.opencontainers.image.source": "https://example.com/repo"}, Annotations: map[string]string{"com.example.note": "annotated"},
		AddHosts: []string{"db.internal=10.1.2.3"}, ShmSize: 128 << 20, Ulimits: []string{"nofile=1234:1234"}}, rec)
	if err != nil {
		t.Fatal(err)
	}
	logs := rec.Logs()
	for _, want := range []string{"10.1.2.3", "db.internal", "131072", "nofile=1234"} {
		if !strings.Contains(logs, want) {
			t.Errorf("RUN output lacks %q:\n%s", want, logs)
		}
	}
	img := testkit.FetchImage(t, ref)
	if got := img.Config.Config.Labels["org.opencontainers.image.source"]; got != "https://example.com/repo" {
		t.Errorf("label = %q", got)
	}
	if got := img.Annotations["com.example.note"]; got != "annotated" {
		t.Errorf("annotation = %q (manifest annotations %v)", got, img.Annotations)
	}
}

func TestCancelReturnsPromptly(t *testing.T) {
	base := busyboxBase(t)
	// The step's shell carries a nonce so no other process on the host
	// (other packages' tests run alongside) is mistaken for it.
	step := fmt.Sprintf("sleep 60 || echo cancel-nonce-%d", time.Now().UnixNano())
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN " + step + "\n"})
	rec := &testkit.Recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	started := rec.Await(progress.VertexStarted, "sleep 60")
	go func() {
		select {
		case <-started:
			time.Sleep(500 * time.Millisecond)
		case <-time.After(time.Minute):
		}
		cancel()
	}()
	_, err := solve.Run(ctx, env.client, solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/cancel:latest"}}, rec)
	canceledAt := time.Now()
	select {
	case <-started:
	default:
		t.Fatalf("sleep step never started; err = %v", err)
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if d := time.Since(canceledAt); d > 5*time.Second {
		t.Errorf("Run took %s after cancel", d)
	}
	n := len(rec.Events())
	time.Sleep(time.Second)
	if len(rec.Events()) != n {
		t.Errorf("events were emitted after Run returned")
	}
	// Returning is not enough: the daemon must have stopped the step too.
	deadline := time.Now().Add(10 * time.Second)
	for running(step) {
		if time.Now().After(deadline) {
			t.Fatal("the canceled RUN step is still running in buildkitd")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// running reports whether a process with cmdline (args joined by spaces)
// containing s exists.
func running(s string) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		raw, err := os.ReadFile(p)
		if err == nil && strings.Contains(strings.ReplaceAll(string(raw), "\x00", " "), s) {
			return true
		}
	}
	return false
}

func TestRegistryCacheExportThenImportAfterPrune(t *testing.T) {
	base := busyboxBase(t)
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM " + base + "\nRUN echo cache-me-" + t.Name() + " > /c\n",
	})
	cacheRef := env.registry + "/cache/test:latest"
	req := solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/cache:latest"}, CacheExport: cacheRef}
	if _, err := solve.Run(testCtx(t), env.client, req, nil); err != nil {
		t.Fatal(err)
	}
	if !testkit.ManifestExists(t, cacheRef) {
		t.Fatalf("cache export did not push %s", cacheRef)
	}
	prune(t)

	rec := &testkit.Recorder{}
	req.CacheExport = ""
	req.CacheImports = []string{cacheRef}
	res, err := solve.Run(testCtx(t), env.client, req, rec)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Find(progress.VertexCached, "cache-me")) != 1 {
		t.Errorf("RUN was not answered from the imported registry cache (StepsCached=%d)", res.StepsCached)
	}
}

func TestRegistryAuthFromMemory(t *testing.T) {
	reg := testkit.RegistryWithAuth(t, "kiln", "pa55word")
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"})
	ref := reg + "/private/img:latest"

	_, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Push: []string{ref}}, nil)
	if err == nil {
		t.Fatal("push without credentials succeeded against an auth-only registry")
	}
	rec := &testkit.Recorder{}
	res, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir:   dir,
		Push:         []string{ref},
		RegistryAuth: map[string]solve.Credentials{reg: {Username: "kiln", Password: "pa55word"}},
	}, rec)
	if err != nil {
		t.Fatalf("push with credentials: %v", err)
	}
	if res.Digest == "" {
		t.Fatal("no digest")
	}
	if rec.Contains("pa55word") {
		t.Errorf("password appears in events")
	}
}

func prune(t *testing.T) {
	t.Helper()
	if err := env.client.Prune(testCtx(t), nil, client.PruneAll); err != nil {
		t.Fatalf("prune build cache: %v", err)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// CallCheck runs the Dockerfile's checks and builds nothing: rule
// violations come back counted and printed with their Dockerfile lines.
func TestCheckReportsLintWarningsAndBuildsNothing(t *testing.T) {
	dir := testkit.ContextDir(t, map[string]string{
		// FromAsCasing (lower-case "as") and a RUN that would fail if it ran.
		"Dockerfile": "FROM scratch as base\nCOPY missing.txt /\n",
	})
	name := env.registry + "/test/check:latest"
	res, err := solve.Run(testCtx(t), env.client, solve.Request{ContextDir: dir, Call: solve.CallCheck, Push: []string{name}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Check == nil || res.Check.Warnings != 1 || !strings.Contains(res.Check.Report, "FromAsCasing") || !strings.Contains(res.Check.Report, "FROM scratch as base") {
		t.Fatalf("check = %+v, want one FromAsCasing warning showing the line", res.Check)
	}
	if res.Digest != "" || testkit.ManifestExists(t, name) {
		t.Error("a check built and pushed an image")
	}

	clean := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch AS base\n"})
	res, err = solve.Run(testCtx(t), env.client, solve.Request{ContextDir: clean, Call: solve.CallCheck}, nil)
	if err != nil || res.Check == nil || res.Check.Warnings != 0 {
		t.Fatalf("check of a clean Dockerfile = %+v, %v; want no warnings", res.Check, err)
	}
}
