package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

const (
	volumeSize = 2 << 30
	cacheDisk  = "kiln-cache"
)

var (
	// registry is where the test registry really listens; only the host
	// side of the tunnel dials it.
	registry string
	// tunnelAddr is where the agent listens for the registry tunnel and
	// what every push and FROM reference names. Nothing else listens
	// there, so a push that lands in the registry went through the tunnel.
	tunnelAddr string
)

func TestMain(m *testing.M) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tunnelAddr = l.Addr().String()
	l.Close()
	testkit.MainWithRegistry(m, "agent tests mount volumes and run buildkitd; they need root", &registry)
}

// fixture is one cache volume attached to a loop device, standing in for
// the VM's virtio disk, plus the agent's directories.
type fixture struct {
	volume string
	loop   string
	mount  string
	state  string
	cgroup string
	dials  atomic.Int32
	logs   *syncBuffer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	vol := testkit.Volume(t, volumeSize)
	out, err := exec.Command("losetup", "--find", "--show", vol).CombinedOutput()
	if err != nil {
		t.Fatalf("attach volume: %v: %s", err, out)
	}
	// Short: the buildkitd socket lives in the state dir.
	dir, err := os.MkdirTemp("", "kag-")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{
		volume: vol,
		loop:   strings.TrimSpace(string(out)),
		mount:  filepath.Join(dir, "root"),
		state:  filepath.Join(dir, "s"),
		cgroup: "kiln-agent-test-" + filepath.Base(dir),
		logs:   &syncBuffer{},
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("host log:\n%s", f.logs.String())
		}
		// Never delete through a mount a failed test left behind.
		mounts, _ := buildkitd.MountsUnder(dir)
		for _, m := range mounts {
			buildkitd.Unmount(m)
		}
		exec.Command("losetup", "--detach", f.loop).Run()
		if m, _ := buildkitd.MountsUnder(dir); len(m) == 0 {
			os.RemoveAll(dir)
		}
	})
	return f
}

func (f *fixture) env(t *testing.T) Env {
	return Env{
		Buildkitd:    testkit.Buildkitd(t),
		Runc:         "/usr/sbin/runc",
		Mount:        f.mount,
		StateDir:     f.state,
		Disks:        map[string]string{cacheDisk: f.loop},
		CgroupParent: f.cgroup,
		Agent:        "kiln-agent test",
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// timedRecorder records events with the time the host received them.
type timedRecorder struct {
	testkit.Recorder
	mu sync.Mutex
	at []time.Time
}

func (r *timedRecorder) Emit(e progress.Event) {
	r.mu.Lock()
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
	r.Recorder.Emit(e)
}

func (r *timedRecorder) receivedAt(i int) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.at[i]
}

type outcome struct {
	res solve.Result
	err error
	at  time.Time
}

// agentRun is one agent run against one host: the agent in a goroutine on
// the guest end of a socketpair, Host.Serve on the other.
type agentRun struct {
	rec       *timedRecorder
	guestConn net.Conn
	host      chan outcome
	agent     chan outcome
}

func start(t *testing.T, f *fixture, hostCtx context.Context, id string, req solve.Request, tweak ...func(*Env, *guest.Job)) *agentRun {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		file := os.NewFile(uintptr(fd), "channel")
		defer file.Close()
		c, err := net.FileConn(file)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	hostEnd, guestEnd := conn(fds[0]), conn(fds[1])
	env := f.env(t)
	b := &agentRun{rec: &timedRecorder{}, guestConn: guestEnd, host: make(chan outcome, 1), agent: make(chan outcome, 1)}
	h := &guest.Host{
		Tunnels: map[string]guest.Dialer{"registry": func(ctx context.Context) (net.Conn, error) {
			f.dials.Add(1)
			return guest.DialTCP(registry)(ctx)
		}},
		Logger: slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	job := guest.Job{
		BuildID:            id,
		Solve:              req,
		CacheDisk:          cacheDisk,
		GC:                 buildkitd.GCPolicy{ReservedSpace: "256MB", MaxUsedSpace: "1536MB", MinFreeSpace: "10%"},
		InsecureRegistries: []string{tunnelAddr},
		Tunnels:            []guest.Tunnel{{Name: "registry", Listen: tunnelAddr}},
	}
	for _, fn := range tweak {
		fn(&env, &job)
	}
	go func() {
		err := Run(context.Background(), guestEnd, env)
		b.agent <- outcome{err: err, at: time.Now()}
	}()
	go func() {
		res, err := h.Serve(hostCtx, hostEnd, job, b.rec)
		b.host <- outcome{res: res, err: err, at: time.Now()}
	}()
	return b
}

func waitFor(t *testing.T, ch <-chan outcome, what string, limit time.Duration) outcome {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(limit):
		t.Fatalf("%s did not return within %s", what, limit)
		panic("unreachable")
	}
}

// runBuild runs one build to the end and checks both sides agree.
func runBuild(t *testing.T, f *fixture, id string, req solve.Request) (solve.Result, *timedRecorder) {
	t.Helper()
	b := start(t, f, context.Background(), id, req)
	h := waitFor(t, b.host, "Host.Serve", 3*time.Minute)
	a := waitFor(t, b.agent, "agent.Run", 30*time.Second)
	if h.err != nil {
		t.Fatalf("build %s: host: %v (agent: %v)", id, h.err, a.err)
	}
	if a.err != nil {
		t.Fatalf("build %s: agent: %v", id, a.err)
	}
	return h.res, b.rec
}

var (
	baseOnce sync.Once
	baseRef  string
	baseErr  error
)

// busyboxBase pushes the busybox base image through an agent once; every
// FROM of it is pulled through the tunnel again.
func busyboxBase(t *testing.T) string {
	t.Helper()
	baseOnce.Do(func() {
		f := newFixture(t)
		ref := tunnelAddr + "/base/busybox:latest"
		_, rec := runBuild(t, f, "base", solve.Request{ContextDir: testkit.BusyboxDir(t), Push: []string{ref}})
		if len(rec.Events()) == 0 {
			baseErr = errors.New("base build emitted no events")
		}
		baseRef = ref
	})
	if baseErr != nil {
		t.Fatal(baseErr)
	}
	return baseRef
}

// assertReleased fails unless the agent left nothing behind: no mount, no
// buildkitd, no build step cgroup, and a volume fsck finds clean.
func assertReleased(t *testing.T, f *fixture) {
	t.Helper()
	if m, _ := buildkitd.MountsUnder(f.mount); len(m) > 0 {
		t.Errorf("still mounted after the agent returned: %v", m)
	}
	if p := processesMentioning(f.state); len(p) > 0 {
		t.Errorf("buildkitd still running: %v", p)
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", f.cgroup)); err == nil {
		t.Errorf("build step cgroup %s left behind", f.cgroup)
	}
	if out, err := exec.Command("e2fsck", "-fn", f.loop).CombinedOutput(); err != nil {
		t.Errorf("volume is not clean after the agent returned: %v\n%s", err, out)
	}
}

func processesMentioning(s string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		cmd := strings.ReplaceAll(strings.TrimRight(string(raw), "\x00"), "\x00", " ")
		if strings.Contains(cmd, s) && !strings.Contains(cmd, ".test") {
			out = append(out, e.Name()+": "+cmd)
		}
	}
	return out
}

func indexOf(events []progress.Event, kind progress.Kind, vertex, name string) int {
	for i, e := range events {
		if e.Kind == kind && (vertex == "" || e.Vertex == vertex) && strings.Contains(e.Name, name) {
			return i
		}
	}
	return -1
}

func TestBuildPushesThroughTheTunnelAndStreamsEvents(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	res, rec := runBuild(t, f, "cold", solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{
			"Dockerfile": "FROM " + base + "\nCOPY hello.txt /hello.txt\nRUN echo one > /one && sleep 1\nRUN cat /one /hello.txt > /two && echo step-two-says-hi\n",
			"hello.txt":  "hello from the host\n",
		}),
		Push: []string{tunnelAddr + "/app/cold:latest"},
	})

	img := testkit.FetchImage(t, registry+"/app/cold:latest")
	if img.Digest != res.Digest || !strings.HasPrefix(res.Digest, "sha256:") {
		t.Errorf("agent reported digest %q, the registry holds %s", res.Digest, img.Digest)
	}
	if got := string(img.Files["/two"]); got != "one\nhello from the host\n" {
		t.Errorf("/two = %q", got)
	}
	if f.dials.Load() == 0 {
		t.Error("the host never dialed the registry for the guest; the push bypassed the tunnel")
	}

	events := rec.Events()
	phaseStart := indexOf(events, progress.Phase, "", "")
	if phaseStart < 0 || events[phaseStart].Phase != PhaseStartingBuildkitd || events[phaseStart+1].Phase != PhaseSolving {
		t.Errorf("phases out of order: %+v", events[:min(3, len(events))])
	}
	for i, e := range events {
		if e.Kind == progress.VertexStarted && i < phaseStart {
			t.Errorf("vertex event before the solving phase")
		}
	}
	var sleepVertex string
	for _, name := range []string{"COPY hello.txt", "RUN echo one", "RUN cat /one"} {
		s := indexOf(events, progress.VertexStarted, "", name)
		if s < 0 {
			t.Errorf("no started event for %q", name)
			continue
		}
		v := events[s].Vertex
		c := indexOf(events, progress.VertexCompleted, v, "")
		if c < s {
			t.Errorf("%q: completed at %d, started at %d", name, c, s)
		}
		if name == "RUN echo one" {
			sleepVertex = v
		}
	}
	logAt := -1
	for i, e := range events {
		if e.Kind == progress.Log && strings.Contains(e.Data, "step-two-says-hi") {
			logAt = i
		}
	}
	if s := indexOf(events, progress.VertexStarted, "", "RUN cat /one"); logAt < s {
		t.Errorf("the step's log (at %d) did not come after its start (at %d)", logAt, s)
	}
	// Streamed as it happened: the one-second step's start reached the
	// host about a second before its end did.
	s, c := indexOf(events, progress.VertexStarted, sleepVertex, ""), indexOf(events, progress.VertexCompleted, sleepVertex, "")
	if gap := rec.receivedAt(c).Sub(rec.receivedAt(s)); gap < 800*time.Millisecond {
		t.Errorf("start and end of a 1s step reached the host %s apart; events are not streamed live", gap)
	}
	assertReleased(t, f)
}

func TestWarmRunOnTheSameVolumeUsesItsCache(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM " + base + "\nRUN echo warm > /warm\nARG N\n" +
			"RUN --mount=type=cache,id=agent-test,target=/c sh -c 'echo run-$N >> /c/log && cp /c/log /log'\n",
	})
	req := func(n string) solve.Request {
		return solve.Request{ContextDir: dir, BuildArgs: map[string]string{"N": n}, Push: []string{tunnelAddr + "/app/warm:" + n}}
	}
	cold, coldRec := runBuild(t, f, "warm1", req("1"))
	assertReleased(t, f)
	if len(coldRec.Find(progress.VertexCached, "RUN echo warm")) != 0 {
		t.Fatal("the first build on a fresh volume was cached")
	}
	started := time.Now()
	warm, warmRec := runBuild(t, f, "warm2", req("2"))
	t.Logf("cold: %d/%d steps cached; warm: %d/%d cached in %s", cold.StepsCached, cold.StepsTotal, warm.StepsCached, warm.StepsTotal, time.Since(started).Round(time.Millisecond))
	if len(warmRec.Find(progress.VertexCached, "RUN echo warm")) != 1 {
		t.Errorf("second build on the same volume did not reuse the cached step")
	}
	if warm.StepsCached <= cold.StepsCached {
		t.Errorf("warm run cached %d steps, cold run %d", warm.StepsCached, cold.StepsCached)
	}
	if got := string(testkit.FetchImage(t, registry+"/app/warm:2").Files["/log"]); got != "run-1\nrun-2\n" {
		t.Errorf("cache mount after two runs holds %q; the first run's files did not survive", got)
	}
	assertReleased(t, f)
}

// session is one agent session driven job by job: the agent in a goroutine
// on the guest end of a socketpair, a set-up guest.Conn on the other.
// tweak changes the builder's shape before the setup.
func session(t *testing.T, f *fixture, setupSink progress.Sink, tweak ...func(*guest.Job)) (*guest.Conn, guest.Job, <-chan outcome) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		file := os.NewFile(uintptr(fd), "channel")
		defer file.Close()
		c, err := net.FileConn(file)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	hostEnd, guestEnd := conn(fds[0]), conn(fds[1])
	agentDone := make(chan outcome, 1)
	go func() {
		err := Run(context.Background(), guestEnd, f.env(t))
		agentDone <- outcome{err: err, at: time.Now()}
	}()
	h := &guest.Host{
		Tunnels: map[string]guest.Dialer{"registry": func(ctx context.Context) (net.Conn, error) {
			f.dials.Add(1)
			return guest.DialTCP(registry)(ctx)
		}},
		Logger: slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	shape := guest.Job{
		CacheDisk:          cacheDisk,
		GC:                 buildkitd.GCPolicy{ReservedSpace: "256MB", MaxUsedSpace: "1536MB", MinFreeSpace: "10%"},
		InsecureRegistries: []string{tunnelAddr},
		Tunnels:            []guest.Tunnel{{Name: "registry", Listen: tunnelAddr}},
	}
	for _, fn := range tweak {
		fn(&shape)
	}
	c, err := h.Connect(context.Background(), hostEnd, shape.Setup(), setupSink)
	if err != nil {
		t.Fatalf("set the builder up: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, shape, agentDone
}

// TestTwoJobsOnOneSessionShareBuildkitdAndCache: one setup, then two jobs
// on the same buildkitd; the second is warm from the first's cache
// without a buildkitd restart, and sees nothing of the first's secret.
// The release stops buildkitd and leaves the volume clean.
func TestTwoJobsOnOneSessionShareBuildkitdAndCache(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	setupRec := &testkit.Recorder{}
	c, shape, agentDone := session(t, f, setupRec)
	if got := setupRec.Find(progress.Phase, ""); len(got) != 1 || got[0].Phase != PhaseStartingBuildkitd {
		t.Errorf("setup phases = %+v, want %q only", got, PhaseStartingBuildkitd)
	}
	daemons := processesMentioning(f.state)
	if len(daemons) == 0 {
		t.Fatal("buildkitd is not running after the setup")
	}
	secret := fmt.Sprintf("kiln-agent-two-jobs-%d", time.Now().UnixNano())
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM " + base + "\nRUN echo warm > /warm\nARG N\n" +
			"RUN --mount=type=secret,id=tok,required=false --mount=type=cache,id=agent-two,target=/c sh -c 'echo run-$N >> /c/log && cp /c/log /log; if [ -e /run/secrets/tok ]; then echo has-secret-$N; else echo no-secret-$N; fi'\n",
	})
	build := func(n string, secrets map[string][]byte) (solve.Result, *testkit.Recorder, time.Duration) {
		job := shape
		job.BuildID = "two-" + n
		job.Solve = solve.Request{ContextDir: dir, BuildArgs: map[string]string{"N": n}, Secrets: secrets, Push: []string{tunnelAddr + "/app/two:" + n}}
		rec := &testkit.Recorder{}
		started := time.Now()
		res, err := c.Run(context.Background(), job, rec)
		if err != nil {
			t.Fatalf("job %s: %v\nlogs:\n%s", n, err, rec.Logs())
		}
		return res, rec, time.Since(started)
	}
	res1, rec1, took1 := build("1", map[string][]byte{"tok": []byte(secret)})
	res2, rec2, took2 := build("2", nil)
	t.Logf("job 1: %d/%d cached in %s; job 2: %d/%d cached in %s", res1.StepsCached, res1.StepsTotal, took1.Round(time.Millisecond), res2.StepsCached, res2.StepsTotal, took2.Round(time.Millisecond))

	if !strings.Contains(rec1.Logs(), "has-secret-1") {
		t.Errorf("job 1 did not get its secret; logs:\n%s", rec1.Logs())
	}
	if !strings.Contains(rec2.Logs(), "no-secret-2") || rec2.Contains(secret) {
		t.Errorf("job 2 saw job 1's secret; logs:\n%s", rec2.Logs())
	}
	for _, e := range rec2.Events() {
		if e.Kind == progress.Phase && e.Phase != PhaseSolving {
			t.Errorf("job 2 went through phase %q: the builder was set up again", e.Phase)
		}
	}
	if len(rec2.Find(progress.VertexCached, "RUN echo warm")) != 1 {
		t.Errorf("job 2 did not answer the unchanged step from job 1's cache")
	}
	if got := string(testkit.FetchImage(t, registry+"/app/two:2").Files["/log"]); got != "run-1\nrun-2\n" {
		t.Errorf("cache mount after two jobs holds %q", got)
	}
	if now := processesMentioning(f.state); strings.Join(now, "\n") != strings.Join(daemons, "\n") {
		t.Errorf("buildkitd changed between jobs:\nbefore %v\nafter  %v", daemons, now)
	}
	if err := c.Err(); err != nil {
		t.Fatalf("the builder is unusable after two good jobs: %v", err)
	}
	if err := c.Release(context.Background()); err != nil {
		t.Fatalf("release: %v", err)
	}
	if a := waitFor(t, agentDone, "agent.Run", time.Minute); a.err != nil {
		t.Errorf("agent after a release: %v", a.err)
	}
	assertReleased(t, f)
}

// TestNamedLocalContextsReachTheSolve: a job's two named local contexts
// arrive in the guest as trees of their own and BuildKit gets each as the
// context its name stands for (COPY --from=NAME).
func TestNamedLocalContextsReachTheSolve(t *testing.T) {
	f := newFixture(t)
	res, _ := runBuild(t, f, "named", solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{
			"Dockerfile": "FROM scratch\nCOPY main.txt /\nCOPY --from=first /file /first\nCOPY --from=second /file /second\nCOPY --from=second /sub /sub\n",
			"main.txt":   "main context\n",
		}),
		LocalContexts: map[string]string{
			"first":  testkit.ContextDir(t, map[string]string{"file": "from the first named context\n"}),
			"second": testkit.ContextDir(t, map[string]string{"file": "from the second named context\n", "sub/deep.txt": "deep\n"}),
		},
		Push: []string{tunnelAddr + "/app/named:latest"},
	})
	img := testkit.FetchImage(t, registry+"/app/named:latest")
	if img.Digest != res.Digest {
		t.Errorf("agent reported digest %q, the registry holds %s", res.Digest, img.Digest)
	}
	for path, want := range map[string]string{
		"/main.txt": "main context\n", "/first": "from the first named context\n",
		"/second": "from the second named context\n", "/sub/deep.txt": "deep\n",
	} {
		if got := string(img.Files[path]); got != want {
			t.Errorf("%s = %q, want %q", path, got, want)
		}
	}
	assertReleased(t, f)
}

// TestProxySetupReachesBuildkitd: a builder set up with a proxy and
// no-proxy hosts starts buildkitd with them in its environment, so the
// registries the guest reaches through tunnels by name bypass the proxy.
func TestProxySetupReachesBuildkitd(t *testing.T) {
	f := newFixture(t)
	const proxy = "http://127.0.0.1:3128"
	c, _, agentDone := session(t, f, nil, func(j *guest.Job) {
		j.Proxy = proxy
		j.NoProxy = []string{"kiln.example.com", "ghcr.io"}
	})
	daemons := processesMentioning(f.state)
	if len(daemons) != 1 {
		t.Fatalf("buildkitd processes after the setup: %v", daemons)
	}
	pid, _, _ := strings.Cut(daemons[0], ":")
	raw, err := os.ReadFile(filepath.Join("/proc", pid, "environ"))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(raw), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	if env["HTTPS_PROXY"] != proxy || env["https_proxy"] != proxy {
		t.Errorf("buildkitd's HTTPS_PROXY = %q, https_proxy = %q; want %s", env["HTTPS_PROXY"], env["https_proxy"], proxy)
	}
	for _, k := range []string{"NO_PROXY", "no_proxy"} {
		if got, want := env[k], "localhost,127.0.0.1,::1,kiln.example.com,ghcr.io"; got != want {
			t.Errorf("buildkitd's %s = %q, want %q", k, got, want)
		}
	}
	if err := c.Release(context.Background()); err != nil {
		t.Fatalf("release: %v", err)
	}
	if a := waitFor(t, agentDone, "agent.Run", time.Minute); a.err != nil {
		t.Errorf("agent after a release: %v", a.err)
	}
	assertReleased(t, f)
}

func TestSecretReachesTheStepButNotTheEvents(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	secret := fmt.Sprintf("kiln-agent-secret-%d", time.Now().UnixNano())
	sum := sha256.Sum256([]byte(secret))
	res, rec := runBuild(t, f, "secret", solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{
			"Dockerfile": "FROM " + base + "\n" +
				`RUN --mount=type=secret,id=tok,required=true sh -c 'echo "token is $(cat /run/secrets/tok)"; sha256sum /run/secrets/tok | cut -d" " -f1 > /tok.sha'` + "\n",
		}),
		Secrets: map[string][]byte{"tok": []byte(secret)},
		Push:    []string{tunnelAddr + "/app/secret:latest"},
	})
	img := testkit.FetchImage(t, registry+"/app/secret:latest")
	if img.Digest != res.Digest {
		t.Errorf("digest mismatch")
	}
	if got := strings.TrimSpace(string(img.Files["/tok.sha"])); got != hex.EncodeToString(sum[:]) {
		t.Errorf("the step saw a different secret: sha %q", got)
	}
	if rec.Contains(secret) {
		t.Error("the secret appeared in the build's events")
	}
	if !strings.Contains(rec.Logs(), "token is ****") {
		t.Errorf("the step's output of the secret was not masked; logs:\n%s", rec.Logs())
	}
	if strings.Contains(f.logs.String(), secret) {
		t.Error("the secret appeared in the host's log")
	}
	if img.ContainsBytes([]byte(secret)) {
		t.Error("the secret is in the image")
	}
	assertReleased(t, f)
	// Not even BuildKit's own records of the step's output may keep it on
	// the volume, which outlives the build; scanned raw, deleted blocks too.
	if found, err := testkit.FileContains(f.volume, []byte(secret)); err != nil {
		t.Fatal(err)
	} else if found {
		t.Error("the secret is stored on the cache volume")
	}
}

func TestHostCancelStopsTheSolveAndReleasesTheVolume(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := start(t, f, ctx, "cancel", solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN sleep 67\n"}),
		Push:       []string{tunnelAddr + "/app/cancel:latest"},
	})
	select {
	case <-b.rec.Await(progress.VertexStarted, "sleep 67"):
	case o := <-b.host:
		t.Fatalf("build ended before the step started: %v", o.err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the step did not start")
	}
	time.Sleep(500 * time.Millisecond)
	canceled := time.Now()
	cancel()
	h := waitFor(t, b.host, "Host.Serve", time.Minute)
	a := waitFor(t, b.agent, "agent.Run", time.Minute)
	t.Logf("after cancel: host returned in %s, agent in %s", h.at.Sub(canceled).Round(time.Millisecond), a.at.Sub(canceled).Round(time.Millisecond))
	if !errors.Is(h.err, context.Canceled) {
		t.Errorf("host err = %v, want context.Canceled", h.err)
	}
	if a.err == nil {
		t.Error("agent reported success for a canceled build")
	}
	if took := h.at.Sub(canceled); took > 15*time.Second {
		t.Errorf("host took %s to return after cancel", took)
	}
	// The one-shot Serve hangs up after a cancel; an agent whose host
	// went away releases the volume by itself.
	if !errors.Is(a.err, guest.ErrHostGone) {
		t.Errorf("agent err = %v, want ErrHostGone", a.err)
	}
	assertReleased(t, f)
	if p := processesMentioning("sleep 67"); len(p) > 0 {
		t.Errorf("the build step survived the cancel: %v", p)
	}
}

func TestAgentDeathMidBuildEndsServePromptly(t *testing.T) {
	base := busyboxBase(t)
	f := newFixture(t)
	b := start(t, f, context.Background(), "death", solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN sleep 68\n"}),
	})
	select {
	case <-b.rec.Await(progress.VertexStarted, "sleep 68"):
	case o := <-b.host:
		t.Fatalf("build ended before the step started: %v", o.err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the step did not start")
	}
	died := time.Now()
	b.guestConn.Close() // the VM's end of the channel is gone
	h := waitFor(t, b.host, "Host.Serve", 30*time.Second)
	t.Logf("host returned %s after the agent's channel closed: %v", h.at.Sub(died).Round(time.Millisecond), h.err)
	if !errors.Is(h.err, guest.ErrAgentGone) {
		t.Errorf("host err = %v, want ErrAgentGone", h.err)
	}
	if took := h.at.Sub(died); took > 2*time.Second {
		t.Errorf("host took %s to notice", took)
	}
	// In a VM the agent dies with it; in-process it notices the host is
	// gone and must still clean up.
	a := waitFor(t, b.agent, "agent.Run", time.Minute)
	if !errors.Is(a.err, guest.ErrHostGone) {
		t.Errorf("agent err = %v, want ErrHostGone", a.err)
	}
	assertReleased(t, f)
	if p := processesMentioning("sleep 68"); len(p) > 0 {
		t.Errorf("the build step survived: %v", p)
	}
}

func TestSetupFailuresReachTheHostAndReleaseTheVolume(t *testing.T) {
	for _, tc := range []struct {
		name  string
		tweak func(*Env, *guest.Job)
		want  string
	}{
		{"buildkitd missing from the image", func(e *Env, _ *guest.Job) { e.Buildkitd = "/nonexistent/buildkitd" }, "start buildkitd /nonexistent/buildkitd"},
		{"cache disk not attached", func(e *Env, j *guest.Job) { j.CacheDisk = "no-such-disk"; e.DiskWait = 200 * time.Millisecond }, `no disk with serial "no-such-disk"`},
		{"image without a state dir", func(e *Env, _ *guest.Job) { e.StateDir = "" }, "state dir is not set"},
		{"unsupported network", func(_ *Env, j *guest.Job) { j.Network = "none" }, `network "none" is not supported`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			b := start(t, f, context.Background(), "setup", solve.Request{
				ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\n"}),
			}, tc.tweak)
			h := waitFor(t, b.host, "Host.Serve", time.Minute)
			a := waitFor(t, b.agent, "agent.Run", time.Minute)
			if h.err == nil || !strings.Contains(h.err.Error(), tc.want) {
				t.Errorf("host err = %v, want it to say %q", h.err, tc.want)
			}
			if a.err == nil {
				t.Error("agent reported success")
			}
			assertReleased(t, f)
			if entries, _ := os.ReadDir(f.mount); len(entries) > 0 {
				t.Errorf("mount point not empty after unmount: %v", entries)
			}
		})
	}
}

// syncBuffer is a bytes.Buffer for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestFindDiskBySysfsSerial uses whatever disk of this machine has a
// serial, the same lookup the VM does for its virtio disks.
func TestFindDiskBySysfsSerial(t *testing.T) {
	matches, _ := filepath.Glob("/sys/block/*/serial")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		serial := strings.TrimSpace(string(b))
		if err != nil || serial == "" {
			continue
		}
		want := "/dev/" + filepath.Base(filepath.Dir(m))
		got, err := findDisk(context.Background(), serial, Env{DiskWait: time.Second})
		if err != nil || got != want {
			t.Errorf("findDisk(%q) = %q, %v; want %s", serial, got, err, want)
		}
		return
	}
	t.Skip("no disk on this machine has a serial")
}
