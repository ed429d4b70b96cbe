package guest

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// socketpair returns two connected unix stream sockets, the closest thing
// to a virtio-serial port that needs no VM.
func socketpair(t *testing.T) (hostEnd, guestEnd net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int, name string) net.Conn {
		f := os.NewFile(uintptr(fd), name)
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	return conn(fds[0], "host"), conn(fds[1], "guest")
}

func testJob(t *testing.T) Job {
	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	return Job{
		BuildID:   "b1",
		CacheDisk: "kiln-cache",
		Solve:     solve.Request{ContextDir: dir},
	}
}

// agentSide accepts the host on guestEnd, reports the setup ready and
// takes the first job.
func agentSide(t *testing.T, guestEnd net.Conn) (*Session, *Task) {
	t.Helper()
	s, err := Accept(context.Background(), guestEnd, AgentOptions{Agent: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	setup, err := s.Setup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := setup.Finish(solve.Result{}, nil); err != nil {
		t.Fatalf("report the setup: %v", err)
	}
	task, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s, task
}

// releaseWhenAsked answers the host's release in the background, as the
// agent does once it tore down; it reports what Next said.
func releaseWhenAsked(s *Session) <-chan error {
	out := make(chan error, 1)
	go func() {
		_, err := s.Next(context.Background())
		if errors.Is(err, ErrReleased) {
			err = s.Released(nil)
		}
		out <- err
	}()
	return out
}

// connect runs Host.Connect in the background and the agent's side of the
// setup in the foreground; it returns both ends, set up.
func connect(t *testing.T, h *Host) (*Conn, *Session) {
	t.Helper()
	hostEnd, guestEnd := socketpair(t)
	type connected struct {
		c   *Conn
		err error
	}
	out := make(chan connected, 1)
	go func() {
		c, err := h.Connect(context.Background(), hostEnd, testJob(t).Setup(), nil)
		out <- connected{c, err}
	}()
	s, err := Accept(context.Background(), guestEnd, AgentOptions{Agent: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	setup, err := s.Setup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	setup.Emit(progress.Event{Kind: progress.Phase, Phase: "starting buildkitd"})
	if err := setup.Finish(solve.Result{}, nil); err != nil {
		t.Fatal(err)
	}
	r := wait(t, out, "Connect")
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.c.Close() })
	return r.c, s
}

// run runs job on c in the background.
func run(ctx context.Context, c *Conn, job Job, sink progress.Sink) <-chan hostResult {
	out := make(chan hostResult, 1)
	go func() {
		res, err := c.Run(ctx, job, sink)
		out <- hostResult{res, err, time.Now()}
	}()
	return out
}

type hostResult struct {
	res solve.Result
	err error
	at  time.Time
}

// serve runs Host.Serve in the background.
func serve(ctx context.Context, h *Host, conn net.Conn, job Job, sink progress.Sink) <-chan hostResult {
	out := make(chan hostResult, 1)
	go func() {
		res, err := h.Serve(ctx, conn, job, sink)
		out <- hostResult{res, err, time.Now()}
	}()
	return out
}

func wait[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func TestJobSecretsEventsAndResultRoundTrip(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	job := testJob(t)
	job.Solve.Secrets = map[string][]byte{"tok": []byte("s3cr3t")}
	job.Solve.RegistryAuth = map[string]solve.Credentials{"kiln:5000": {Username: "u", Password: "p"}}
	job.Solve.Push = []string{"kiln:5000/app:latest"}
	job.GC.MaxUsedSpace = "1GB"
	rec := &testkit.Recorder{}
	done := serve(context.Background(), &Host{}, hostEnd, job, rec)

	const n = 3000
	s, task := agentSide(t, guestEnd)
	got := task.Job()
	if string(got.Solve.Secrets["tok"]) != "s3cr3t" || got.Solve.RegistryAuth["kiln:5000"].Password != "p" {
		t.Errorf("memory-only fields did not arrive: secrets=%v auth=%v", got.Solve.Secrets, got.Solve.RegistryAuth)
	}
	if got.CacheDisk != "kiln-cache" || task.Setup().GC.MaxUsedSpace != "1GB" || got.Solve.Push[0] != "kiln:5000/app:latest" {
		t.Errorf("job fields lost: %+v", got)
	}
	if got.Solve.ContextDir != treeContext {
		t.Errorf("the host path of the context reached the guest: %q", got.Solve.ContextDir)
	}
	for i := range n {
		task.Emit(progress.Event{Kind: progress.Log, Data: strconv.Itoa(i)})
	}
	s.Logger().Info("agent says hi", "disk", "vdb")
	want := solve.Result{Digest: "sha256:abc", StepsTotal: 4, StepsCached: 3}
	if err := task.Finish(want, nil); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	released := releaseWhenAsked(s)
	r := wait(t, done, "Serve")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if err := wait(t, released, "the release"); err != nil {
		t.Errorf("agent's release: %v", err)
	}
	if !reflect.DeepEqual(r.res, want) {
		t.Errorf("result = %+v, want %+v", r.res, want)
	}
	events := rec.Events()
	if len(events) != n {
		t.Fatalf("host got %d events, agent sent %d", len(events), n)
	}
	for i, e := range events {
		if e.Data != strconv.Itoa(i) {
			t.Fatalf("event %d carries %q: events out of order", i, e.Data)
		}
	}
}

// TestTwoJobsOverOneSession: one setup, two jobs, each with its own
// events, result and memory-only fields; the second job's memory part
// holds nothing of the first's, and release ends the agent's session.
func TestTwoJobsOverOneSession(t *testing.T) {
	c, s := connect(t, &Host{})
	type jobRun struct {
		secret string
		rec    *testkit.Recorder
		result solve.Result
	}
	runs := []jobRun{
		{secret: "first-secret", rec: &testkit.Recorder{}, result: solve.Result{Digest: "sha256:one", StepsTotal: 3}},
		{rec: &testkit.Recorder{}, result: solve.Result{Digest: "sha256:two", StepsTotal: 3, StepsCached: 2}},
	}
	for i, jr := range runs {
		job := testJob(t)
		job.BuildID = fmt.Sprintf("job%d", i+1)
		if jr.secret != "" {
			job.Solve.Secrets = map[string][]byte{"s": []byte(jr.secret)}
			job.Solve.RegistryAuth = map[string]solve.Credentials{"kiln:5000": {Username: "u", Password: jr.secret}}
		}
		done := run(context.Background(), c, job, jr.rec)
		task, err := s.Next(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if task.Seq() != i+1 || task.Job().BuildID != job.BuildID {
			t.Errorf("job %d arrived as seq %d, build %q", i+1, task.Seq(), task.Job().BuildID)
		}
		if i == 1 && (task.Job().Solve.Secrets != nil || task.Job().Solve.RegistryAuth != nil) {
			t.Errorf("the second job carries memory-only fields: %v %v", task.Job().Solve.Secrets, task.Job().Solve.RegistryAuth)
		}
		if i == 0 && string(task.Job().Solve.Secrets["s"]) != jr.secret {
			t.Errorf("first job's secret did not arrive")
		}
		req, err := task.FetchContext(context.Background(), t.TempDir())
		if err != nil {
			t.Fatalf("job %d: fetch context: %v", i+1, err)
		}
		if b, err := os.ReadFile(filepath.Join(req.ContextDir, "Dockerfile")); err != nil || string(b) != "FROM scratch\n" {
			t.Errorf("job %d context: %q %v", i+1, b, err)
		}
		task.Emit(progress.Event{Kind: progress.Log, Data: job.BuildID + " says hi"})
		if err := task.Finish(jr.result, nil); err != nil {
			t.Fatalf("job %d: Finish: %v", i+1, err)
		}
		r := wait(t, done, "Run")
		if r.err != nil || !reflect.DeepEqual(r.res, jr.result) {
			t.Errorf("job %d: result %+v, %v; want %+v", i+1, r.res, r.err, jr.result)
		}
		if got := jr.rec.Events(); len(got) != 1 || got[0].Data != job.BuildID+" says hi" {
			t.Errorf("job %d's events: %+v", i+1, got)
		}
		if c.Err() != nil {
			t.Fatalf("after job %d the connection is unusable: %v", i+1, c.Err())
		}
	}
	released := releaseWhenAsked(s)
	if err := c.Release(context.Background()); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := wait(t, released, "the agent's release"); err != nil {
		t.Errorf("agent side of the release: %v", err)
	}
	select {
	case <-s.Context().Done():
	case <-time.After(5 * time.Second):
		t.Error("the agent's session did not end after the release")
	}
	if c.Err() == nil {
		t.Error("a released connection still takes jobs")
	}
}

func TestReleaseReportsTheAgentsTeardownError(t *testing.T) {
	c, s := connect(t, &Host{})
	go func() {
		if _, err := s.Next(context.Background()); errors.Is(err, ErrReleased) {
			s.Released(errors.New("release cache volume: device busy"))
		}
	}()
	if err := c.Release(context.Background()); err == nil || !strings.Contains(err.Error(), "device busy") {
		t.Errorf("Release err = %v, want the agent's teardown error", err)
	}
}

// TestConfirmedCancelLeavesTheSessionUsable: a job canceled by the host and
// confirmed by the agent within CancelGrace ends the job, not the session.
func TestConfirmedCancelLeavesTheSessionUsable(t *testing.T) {
	c, s := connect(t, &Host{CancelGrace: 5 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := run(ctx, c, testJob(t), nil)
	task, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-task.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the job's context did not end after the host canceled")
	}
	if cause := context.Cause(task.Context()); !errors.Is(cause, ErrCanceledByHost) {
		t.Errorf("cause = %v, want ErrCanceledByHost", cause)
	}
	if s.Context().Err() != nil {
		t.Error("a job's cancel ended the whole session")
	}
	task.Finish(solve.Result{}, fmt.Errorf("solve: %w", context.Cause(task.Context())))
	if r := wait(t, done, "Run"); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Run err = %v, want context.Canceled", r.err)
	}
	if err := c.Err(); err != nil {
		t.Fatalf("a confirmed cancel left the connection unusable: %v", err)
	}
	job := testJob(t)
	job.BuildID = "after-cancel"
	done = run(context.Background(), c, job, nil)
	task, err = s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if task.Context().Err() != nil {
		t.Error("the next job starts canceled")
	}
	task.Finish(solve.Result{Digest: "sha256:next"}, nil)
	if r := wait(t, done, "Run"); r.err != nil || r.res.Digest != "sha256:next" {
		t.Errorf("job after a cancel: %+v %v", r.res, r.err)
	}
}

// TestBrokenBuilderTakesNoMoreJobs: an agent that reports its builder
// broken (buildkitd exited) gets no further job.
func TestBrokenBuilderTakesNoMoreJobs(t *testing.T) {
	c, s := connect(t, &Host{})
	done := run(context.Background(), c, testJob(t), nil)
	task, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	task.MarkBroken(errors.New("buildkitd exited"))
	task.Finish(solve.Result{}, errors.New("solve failed"))
	wait(t, done, "Run")
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "buildkitd exited") {
		t.Errorf("Err = %v, want the agent's reason", err)
	}
	if _, err := c.Run(context.Background(), testJob(t), nil); err == nil || !strings.Contains(err.Error(), "buildkitd exited") {
		t.Errorf("Run on a broken builder: %v", err)
	}
}

func TestJobWithAnotherSetupIsRefused(t *testing.T) {
	c, _ := connect(t, &Host{})
	job := testJob(t)
	job.MaxParallelism = 8
	if _, err := c.Run(context.Background(), job, nil); err == nil || !strings.Contains(err.Error(), "setup differs") {
		t.Errorf("err = %v", err)
	}
}

func TestSetupFailureIsConnectsError(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	out := make(chan error, 1)
	go func() {
		_, err := (&Host{}).Connect(context.Background(), hostEnd, testJob(t).Setup(), nil)
		out <- err
	}()
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	setup, err := s.Setup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	setup.Finish(solve.Result{}, errors.New("start buildkitd: no such file"))
	if err := wait(t, out, "Connect"); err == nil || err.Error() != "start buildkitd: no such file" {
		t.Errorf("Connect err = %v, want the agent's setup error verbatim", err)
	}
}

func TestEventsArriveWhileTheBuildRuns(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	rec := &testkit.Recorder{}
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), rec)
	s, task := agentSide(t, guestEnd)
	arrived := rec.Await(progress.VertexStarted, "RUN make")
	task.Emit(progress.Event{Kind: progress.VertexStarted, Name: "RUN make"})
	select {
	case <-arrived:
	case <-time.After(5 * time.Second):
		t.Fatal("an event was held back until the end of the build")
	}
	task.Finish(solve.Result{}, errors.New("build failed: exit code 2"))
	releaseWhenAsked(s)
	r := wait(t, done, "Serve")
	if r.err == nil || r.err.Error() != "build failed: exit code 2" {
		t.Errorf("Serve error = %v, want the agent's error verbatim", r.err)
	}
}

// TestVersionMismatchIsAClearErrorOnBothSides: an agent of the previous
// version (a builder image built by an older kiln) or a newer one is
// refused, with a message that says to rebuild the builder image.
func TestVersionMismatchIsAClearErrorOnBothSides(t *testing.T) {
	for _, v := range []int{Version - 1, Version + 1} {
		hostEnd, guestEnd := socketpair(t)
		done := serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
		_, agentErr := accept(context.Background(), guestEnd, AgentOptions{Agent: "kiln-agent other"}, v)
		r := wait(t, done, "Serve")
		for side, err := range map[string]error{"host": r.err, "agent": agentErr} {
			if !errors.Is(err, ErrVersionMismatch) {
				t.Errorf("agent version %d: %s: err = %v, want ErrVersionMismatch", v, side, err)
				continue
			}
			msg := err.Error()
			if !strings.Contains(msg, fmt.Sprintf("version %d", v)) || !strings.Contains(msg, "rebuild the builder image") {
				t.Errorf("agent version %d: %s error does not say what is wrong and what to do: %v", v, side, err)
			}
		}
	}
}

func TestHostRefusesSomethingThatIsNotAHello(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	// What the placeholder agent of the first builder images prints.
	io.WriteString(guestEnd, "kiln-agent ready 6.1.0-28-amd64 512\n")
	r := wait(t, done, "Serve")
	if r.err == nil || !strings.Contains(r.err.Error(), "kiln-agent ready") || !strings.Contains(r.err.Error(), "hello") {
		t.Errorf("err = %v, want a refusal quoting what the guest sent", r.err)
	}
}

// TestHostSpeaksOnlyAfterHello guards the virtio-serial gotcha: anything
// the host writes before the guest opened the port is lost.
func TestHostSpeaksOnlyAfterHello(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{HelloTimeout: 500 * time.Millisecond}, hostEnd, testJob(t), nil)
	guestEnd.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	if n, err := guestEnd.Read(b[:]); n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("host wrote before the agent's hello: n=%d err=%v", n, err)
	}
	start := time.Now()
	r := wait(t, done, "Serve")
	if r.err == nil || !strings.Contains(r.err.Error(), "did not say hello within 500ms") {
		t.Errorf("err = %v, want a hello timeout", r.err)
	}
	if took := r.at.Sub(start); took > 2*time.Second {
		t.Errorf("Serve returned %s after the hello timeout", took)
	}
}

func TestHostCancelReachesAgent(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := serve(ctx, &Host{}, hostEnd, testJob(t), nil)
	_, task := agentSide(t, guestEnd)
	cancel()
	select {
	case <-task.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("agent's context did not end after the host canceled")
	}
	if cause := context.Cause(task.Context()); !errors.Is(cause, ErrCanceledByHost) {
		t.Errorf("cause = %v, want ErrCanceledByHost", cause)
	}
	// The host keeps waiting for the agent to confirm it stopped.
	select {
	case r := <-done:
		t.Fatalf("Serve returned before the agent confirmed the cancel: %v", r.err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := task.Finish(solve.Result{StepsTotal: 1}, fmt.Errorf("build canceled: %w", context.Cause(task.Context()))); err != nil {
		t.Errorf("Finish: %v", err)
	}
	r := wait(t, done, "Serve")
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("Serve err = %v, want context.Canceled", r.err)
	}
}

func TestHostGivesUpOnAnAgentThatIgnoresCancel(t *testing.T) {
	c, s := connect(t, &Host{CancelGrace: 300 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := run(ctx, c, testJob(t), nil)
	if _, err := s.Next(context.Background()); err != nil {
		t.Fatal(err)
	}
	cancel()
	r := wait(t, done, "Run")
	if !errors.Is(r.err, context.Canceled) || !strings.Contains(r.err.Error(), "did not confirm") {
		t.Errorf("err = %v", r.err)
	}
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "did not confirm") {
		t.Errorf("after an unconfirmed cancel the connection still takes jobs: Err = %v", err)
	}
}

func TestAgentDeathEndsServePromptly(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	_, task := agentSide(t, guestEnd)
	task.Emit(progress.Event{Kind: progress.VertexStarted, Name: "RUN make"})
	died := time.Now()
	guestEnd.Close()
	r := wait(t, done, "Serve")
	if !errors.Is(r.err, ErrAgentGone) {
		t.Errorf("err = %v, want ErrAgentGone", r.err)
	}
	if took := r.at.Sub(died); took > time.Second {
		t.Errorf("Serve took %s to notice the agent died", took)
	}
}

// freezable relays bytes between two connections until frozen, after
// which it forwards nothing and closes nothing: a guest whose kernel hung.
func freezable(t *testing.T, a, b net.Conn) (freeze func()) {
	var frozen atomic.Bool
	relay := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				return
			}
			for frozen.Load() {
				time.Sleep(10 * time.Millisecond)
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
	go relay(a, b)
	go relay(b, a)
	return func() { frozen.Store(true) }
}

func TestHostGivesUpOnAFrozenAgent(t *testing.T) {
	hostEnd, relayHost := socketpair(t)
	relayGuest, guestEnd := socketpair(t)
	freeze := freezable(t, relayHost, relayGuest)
	const limit = 400 * time.Millisecond
	done := serve(context.Background(), &Host{Unresponsive: limit}, hostEnd, testJob(t), nil)
	agentSide(t, guestEnd)
	// An agent that is merely quiet answers the pings: no verdict.
	select {
	case r := <-done:
		t.Fatalf("Serve gave up on a live agent: %v", r.err)
	case <-time.After(4 * limit):
	}
	freeze()
	frozeAt := time.Now()
	r := wait(t, done, "Serve")
	if !errors.Is(r.err, ErrAgentUnresponsive) || !errors.Is(r.err, ErrAgentGone) {
		t.Fatalf("err = %v, want ErrAgentUnresponsive (an ErrAgentGone)", r.err)
	}
	// The last answer came up to a ping interval (limit/4) before the
	// freeze.
	if took := r.at.Sub(frozeAt); took < limit/2 || took > 3*limit {
		t.Errorf("Serve gave up %s after the agent froze, want between %s and %s", took, limit/2, 3*limit)
	}
}

// TestIdleFrozenAgentIsNoticed: the watch runs between jobs too, so a
// builder whose VM froze while idle is not handed the next job.
func TestIdleFrozenAgentIsNoticed(t *testing.T) {
	hostEnd, relayHost := socketpair(t)
	relayGuest, guestEnd := socketpair(t)
	freeze := freezable(t, relayHost, relayGuest)
	const limit = 400 * time.Millisecond
	h := &Host{Unresponsive: limit}
	out := make(chan *Conn, 1)
	go func() {
		c, err := h.Connect(context.Background(), hostEnd, testJob(t).Setup(), nil)
		if err != nil {
			t.Error(err)
		}
		out <- c
	}()
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	setup, _ := s.Setup(context.Background())
	setup.Finish(solve.Result{}, nil)
	c := wait(t, out, "Connect")
	if c == nil {
		t.FailNow()
	}
	defer c.Close()
	time.Sleep(4 * limit)
	if err := c.Err(); err != nil {
		t.Fatalf("an idle, live agent was given up on: %v", err)
	}
	freeze()
	select {
	case <-c.Done():
	case <-time.After(10 * limit):
		t.Fatal("a frozen idle agent was not noticed")
	}
	if err := c.Err(); !errors.Is(err, ErrAgentUnresponsive) {
		t.Errorf("Err = %v, want ErrAgentUnresponsive", err)
	}
	if _, err := c.Run(context.Background(), testJob(t), nil); !errors.Is(err, ErrAgentGone) {
		t.Errorf("Run on a frozen builder: %v, want ErrAgentGone", err)
	}
}

func TestHostDeathEndsAgentContext(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	s, task := agentSide(t, guestEnd)
	hostEnd.Close()
	select {
	case <-task.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("agent did not notice the host went away")
	}
	if cause := context.Cause(task.Context()); !errors.Is(cause, ErrHostGone) {
		t.Errorf("cause = %v, want ErrHostGone", cause)
	}
	if err := task.Finish(solve.Result{}, nil); !errors.Is(err, ErrHostGone) && err == nil {
		t.Errorf("Finish to a dead host: err = %v", err)
	}
	if _, err := s.Next(context.Background()); !errors.Is(err, ErrHostGone) {
		t.Errorf("Next after the host went away: err = %v, want ErrHostGone", err)
	}
}

// echoServer answers every connection with "echo:" and what it read until
// the client half-closed, which proves half-closes cross the tunnel.
func echoServer(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				data, _ := io.ReadAll(c)
				c.Write(append([]byte("echo:"), data...))
			}()
		}
	}()
	return l.Addr().String()
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestTunnelForwardsGuestConnectionsToTheHostDialer(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	target := echoServer(t)
	listen := freeAddr(t)
	var dials atomic.Int32
	h := &Host{Tunnels: map[string]Dialer{
		"registry": func(ctx context.Context) (net.Conn, error) {
			dials.Add(1)
			return DialTCP(target)(ctx)
		},
		"broken": DialTCP(freeAddr(t)),
	}}
	job := testJob(t)
	job.Tunnels = []Tunnel{{Name: "registry", Listen: listen}, {Name: "broken", Listen: freeAddr(t)}}
	done := serve(context.Background(), h, hostEnd, job, nil)
	s, task := agentSide(t, guestEnd)
	stop, err := task.ListenTunnels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", listen)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			msg := strings.Repeat(fmt.Sprintf("conn %d ", i), 20000)
			c.Write([]byte(msg))
			c.(*net.TCPConn).CloseWrite()
			got, _ := io.ReadAll(c)
			if string(got) != "echo:"+msg {
				t.Errorf("conn %d: got %d bytes back, want %d", i, len(got), len(msg)+5)
			}
		}()
	}
	wg.Wait()
	if n := dials.Load(); n != 10 {
		t.Errorf("host dialed %d times for 10 guest connections", n)
	}

	// A tunnel whose host side cannot connect closes the guest connection
	// instead of leaving it hanging.
	c, err := net.Dial("tcp", job.Tunnels[1].Listen)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("broken tunnel: read n=%d err=%v, want the connection closed", n, err)
	}
	c.Close()

	// A name the job does not list is refused even though the host knows it.
	if _, err := task.OpenTunnel(context.Background(), "egress"); err == nil || !strings.Contains(err.Error(), `no tunnel "egress"`) {
		t.Errorf("unlisted tunnel: err = %v", err)
	}

	stop()
	if _, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		t.Error("the guest still listens after stop")
	}
	task.Finish(solve.Result{}, nil)
	releaseWhenAsked(s)
	if r := wait(t, done, "Serve"); r.err != nil {
		t.Fatal(r.err)
	}
}

// TestJobEndClosesItsTunnelsAndStreams: a tunnel connection still open
// when its job ends is closed by the host, and neither a tunnel nor the
// context of an ended job can be opened during the next one.
func TestJobEndClosesItsTunnelsAndStreams(t *testing.T) {
	target := freeAddr(t)
	l, err := net.Listen("tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	upstreamClosed := make(chan struct{})
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, c) // until the host closes its end
		close(upstreamClosed)
	}()
	c, s := connect(t, &Host{Tunnels: map[string]Dialer{"registry": DialTCP(target)}})
	job := testJob(t)
	job.Tunnels = []Tunnel{{Name: "registry", Listen: freeAddr(t)}}
	done := run(context.Background(), c, job, nil)
	task1, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stream, err := task1.OpenTunnel(context.Background(), "registry")
	if err != nil {
		t.Fatal(err)
	}
	// The agent "forgets" to close it; the job ends anyway.
	task1.Finish(solve.Result{}, nil)
	wait(t, done, "Run")
	wait(t, upstreamClosed, "the host to close the job's tunnel connection")
	stream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := stream.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("the guest end of an ended job's tunnel is still open")
	}

	done = run(context.Background(), c, job, nil)
	task2, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := task1.OpenTunnel(context.Background(), "registry"); err == nil || !strings.Contains(err.Error(), "job 1 is not running") {
		t.Errorf("tunnel of an ended job during the next: err = %v", err)
	}
	if _, err := task1.FetchContext(context.Background(), t.TempDir()); err == nil {
		t.Error("the context of an ended job was served during the next")
	}
	task2.Finish(solve.Result{}, nil)
	if r := wait(t, done, "Run"); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestHostRefusesTunnelWithoutDialer(t *testing.T) {
	c, _ := connect(t, &Host{})
	job := testJob(t)
	job.Tunnels = []Tunnel{{Name: "registry", Listen: "127.0.0.1:5000"}}
	_, err := c.Run(context.Background(), job, nil)
	if err == nil || !strings.Contains(err.Error(), `tunnel "registry" has no host-side dialer`) {
		t.Errorf("err = %v", err)
	}
}

type entry struct {
	mode  fs.FileMode
	uid   int
	data  string
	mtime time.Time
}

// snapshot records what COPY would see of every entry below dir.
func snapshot(t *testing.T, dir string) map[string]entry {
	out := map[string]entry{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		e := entry{mode: fi.Mode(), uid: int(fi.Sys().(*syscall.Stat_t).Uid)}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			e.data, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			e.data = string(b)
			e.mtime = fi.ModTime()
		default:
			e.mtime = fi.ModTime()
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestContextArrivesWithModesOwnersLinksAndTimes(t *testing.T) {
	ctxDir, dfDir := t.TempDir(), t.TempDir()
	testkit.WriteFiles(t, ctxDir, map[string]string{
		"app/main.go":       "package main\n",
		"app/run.sh":        "#!/bin/sh\necho hi\n",
		"deep/a/b/c/d.txt":  "deep\n",
		"big.bin":           strings.Repeat("x", 3<<20),
		"locked/secret.txt": "only root\n",
	})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Chmod(filepath.Join(ctxDir, "app/run.sh"), 0o755|fs.ModeSetuid))
	must(os.Chmod(filepath.Join(ctxDir, "locked/secret.txt"), 0o400))
	must(os.Chown(filepath.Join(ctxDir, "app/main.go"), 1234, 5678))
	must(os.Symlink("app/main.go", filepath.Join(ctxDir, "link")))
	must(os.Symlink("/etc/passwd", filepath.Join(ctxDir, "abs-link")))
	must(os.Mkdir(filepath.Join(ctxDir, "empty"), 0o750))
	old := time.Date(2020, 1, 2, 3, 4, 5, 600, time.UTC)
	must(os.Chtimes(filepath.Join(ctxDir, "app/main.go"), old, old))
	must(os.Chtimes(filepath.Join(ctxDir, "deep/a"), old, old))
	must(os.Chmod(filepath.Join(ctxDir, "locked"), 0o500))
	testkit.WriteFiles(t, dfDir, map[string]string{"build/Dockerfile": "FROM scratch\nCOPY . /\n"})

	hostEnd, guestEnd := socketpair(t)
	job := testJob(t)
	job.Solve.ContextDir, job.Solve.DockerfileDir, job.Solve.DockerfileName = ctxDir, dfDir, "build/Dockerfile"
	done := serve(context.Background(), &Host{}, hostEnd, job, nil)
	s, task := agentSide(t, guestEnd)
	if task.Job().Solve.DockerfileDir != treeDockerfile {
		t.Errorf("wire dockerfile dir = %q", task.Job().Solve.DockerfileDir)
	}
	work := t.TempDir()
	req, err := task.FetchContext(context.Background(), work)
	if err != nil {
		t.Fatal(err)
	}
	task.Finish(solve.Result{}, nil)
	releaseWhenAsked(s)
	wait(t, done, "Serve")

	if req.ContextDir != filepath.Join(work, "context") || req.DockerfileDir != filepath.Join(work, "dockerfile") || req.DockerfileName != "build/Dockerfile" {
		t.Errorf("request paths: %+v", req)
	}
	for _, pair := range [][2]string{{ctxDir, req.ContextDir}, {dfDir, req.DockerfileDir}} {
		want, got := snapshot(t, pair[0]), snapshot(t, pair[1])
		if len(want) != len(got) {
			t.Errorf("%d entries arrived, %d sent", len(got), len(want))
		}
		for name, w := range want {
			g, ok := got[name]
			switch {
			case !ok:
				t.Errorf("%s missing", name)
			case g.mode != w.mode || g.uid != w.uid || g.data != w.data:
				t.Errorf("%s: got mode %v uid %d (%d bytes), want mode %v uid %d (%d bytes)", name, g.mode, g.uid, len(g.data), w.mode, w.uid, len(w.data))
			case !g.mtime.Equal(w.mtime):
				t.Errorf("%s: mtime %v, want %v", name, g.mtime, w.mtime)
			}
		}
	}
}

func TestContextSendFailureIsExplainedByTheHost(t *testing.T) {
	job := testJob(t)
	if err := syscall.Mkfifo(filepath.Join(job.Solve.ContextDir, "pipe"), 0o644); err != nil {
		t.Fatal(err)
	}
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{}, hostEnd, job, nil)
	s, task := agentSide(t, guestEnd)
	_, err := task.FetchContext(context.Background(), t.TempDir())
	if err == nil {
		t.Fatal("a context with a named pipe arrived")
	}
	task.Finish(solve.Result{}, err)
	releaseWhenAsked(s)
	r := wait(t, done, "Serve")
	if r.err == nil || !strings.Contains(r.err.Error(), "pipe is a named pipe") {
		t.Errorf("host err = %v, want the host-side reason", r.err)
	}
}

// TestCutOffContextIsAnError: a tar cut off between two entries is a valid,
// smaller tar; only the chunk terminator tells the difference.
func TestCutOffContextIsAnError(t *testing.T) {
	src := t.TempDir()
	testkit.WriteFiles(t, src, map[string]string{"a": "first", "b": strings.Repeat("second", 1000)})
	var full bytes.Buffer
	if err := sendTreeChunked(&full, src); err != nil {
		t.Fatal(err)
	}
	if err := receiveTreeChunked(bytes.NewReader(full.Bytes()), t.TempDir()); err != nil {
		t.Fatalf("complete transfer: %v", err)
	}
	// Drop the terminator: the tar inside is still complete.
	cut := full.Bytes()[:full.Len()-len("{}\n")-4]
	if err := receiveTreeChunked(bytes.NewReader(cut), t.TempDir()); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("transfer without terminator: err = %v, want ErrUnexpectedEOF", err)
	}
}

func TestReceiveTreeKeepsEntriesInsideTheTarget(t *testing.T) {
	outside := t.TempDir()
	for name, entries := range map[string][]tar.Header{
		"dotdot": {{Name: "../escaped", Typeflag: tar.TypeReg, Mode: 0o644}},
		"through a symlink": {
			{Name: "l", Typeflag: tar.TypeSymlink, Linkname: outside},
			{Name: "l/escaped", Typeflag: tar.TypeReg, Mode: 0o644},
		},
		"absolute": {{Name: outside + "/escaped", Typeflag: tar.TypeReg, Mode: 0o644}},
	} {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, h := range entries {
			tw.WriteHeader(&h)
		}
		tw.Close()
		target := t.TempDir()
		err := receiveTree(&buf, target)
		if _, statErr := os.Stat(filepath.Join(outside, "escaped")); statErr == nil {
			t.Fatalf("%s: an entry was written outside the target", name)
		}
		if err == nil {
			t.Errorf("%s: no error for an escaping entry", name)
		}
	}
}

// TestNamedLocalContextsArriveAsTreesOfTheirOwn: each of a job's named
// local contexts travels as a tree of its own (named/N in the order of
// the sorted names; the guest never sees a host path) and lands in a
// directory of its own, which the fetched request names.
func TestNamedLocalContextsArriveAsTreesOfTheirOwn(t *testing.T) {
	alpha, zeta := t.TempDir(), t.TempDir()
	testkit.WriteFiles(t, alpha, map[string]string{"file": "from alpha\n", "sub/deep.txt": "deep in alpha\n"})
	testkit.WriteFiles(t, zeta, map[string]string{"file": "from zeta\n"})
	if err := os.Symlink("file", filepath.Join(zeta, "link")); err != nil {
		t.Fatal(err)
	}
	hostEnd, guestEnd := socketpair(t)
	job := testJob(t)
	job.Solve.LocalContexts = map[string]string{"zeta": zeta, "alpha": alpha}
	done := serve(context.Background(), &Host{}, hostEnd, job, nil)
	s, task := agentSide(t, guestEnd)
	wire := task.Job().Solve.LocalContexts
	if want := map[string]string{"alpha": "named/0", "zeta": "named/1"}; !reflect.DeepEqual(wire, want) {
		t.Errorf("wire local contexts = %v, want %v", wire, want)
	}
	work := t.TempDir()
	req, err := task.FetchContext(context.Background(), work)
	if err != nil {
		t.Fatal(err)
	}
	task.Finish(solve.Result{}, nil)
	releaseWhenAsked(s)
	if r := wait(t, done, "Serve"); r.err != nil {
		t.Fatal(r.err)
	}

	want := map[string]string{"alpha": filepath.Join(work, "named", "0"), "zeta": filepath.Join(work, "named", "1")}
	if !reflect.DeepEqual(req.LocalContexts, want) {
		t.Errorf("fetched local contexts = %v, want %v", req.LocalContexts, want)
	}
	if req.ContextDir != filepath.Join(work, "context") {
		t.Errorf("context dir = %q", req.ContextDir)
	}
	for name, src := range map[string]string{"alpha": alpha, "zeta": zeta} {
		if got, sent := snapshot(t, req.LocalContexts[name]), snapshot(t, src); !reflect.DeepEqual(got, sent) {
			t.Errorf("named context %s arrived as %v, sent %v", name, got, sent)
		}
	}
	if got := task.Job().Solve.LocalContexts; !reflect.DeepEqual(got, wire) {
		t.Errorf("FetchContext changed the job's own request: %v", got)
	}
}

// fetchTree opens the context stream name of seq, as FetchContext does,
// and unpacks it into a new directory.
func fetchTree(t *testing.T, s *Session, seq int, name string) (string, error) {
	t.Helper()
	stream, err := s.open(kindContext, name, seq)
	if err != nil {
		return "", err
	}
	defer stream.Close()
	dir := t.TempDir()
	return dir, receiveTreeChunked(stream, dir)
}

// TestJobFetchesOnlyItsOwnTrees: the trees a job may fetch are those of
// its own request. During job 2 neither job 1's seq nor a tree job 1 had
// and job 2 has not is served, and job 2's named/0 is its own directory,
// not job 1's; nor is any name that is not a tree of the job.
func TestJobFetchesOnlyItsOwnTrees(t *testing.T) {
	c, s := connect(t, &Host{})
	dirs := map[string]string{}
	for _, n := range []string{"1a", "1b", "2a"} {
		dirs[n] = t.TempDir()
		testkit.WriteFiles(t, dirs[n], map[string]string{"file": "job " + n + "\n"})
	}
	job1 := testJob(t)
	job1.Solve.LocalContexts = map[string]string{"a": dirs["1a"], "b": dirs["1b"]}
	done := run(context.Background(), c, job1, nil)
	task1, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	req1, err := task1.FetchContext(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]string{"a": "1a", "b": "1b"} {
		if b, _ := os.ReadFile(filepath.Join(req1.LocalContexts[name], "file")); string(b) != "job "+d+"\n" {
			t.Errorf("job 1's context %s holds %q", name, b)
		}
	}
	task1.Finish(solve.Result{}, nil)
	wait(t, done, "Run")

	job2 := testJob(t)
	job2.BuildID = "b2"
	job2.Solve.LocalContexts = map[string]string{"a": dirs["2a"]}
	done = run(context.Background(), c, job2, nil)
	task2, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		seq        int
		name, want string
	}{
		{1, "named/0", "job 1 is not running"},
		{1, "named/1", "job 1 is not running"},
		{2, "named/1", `no context "named/1" in job 2`},
		{2, "named/0/../1", `no context "named/0/../1" in job 2`},
		{2, "../named/1", `no context "../named/1" in job 2`},
		{2, dirs["1a"], "in job 2"},
	} {
		if _, err := fetchTree(t, s, tc.seq, tc.name); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("tree %q of job %d during job 2: err = %v, want %q", tc.name, tc.seq, err, tc.want)
		}
	}
	if _, err := task1.FetchContext(context.Background(), t.TempDir()); err == nil {
		t.Error("job 1's trees were served during job 2")
	}
	got, err := fetchTree(t, s, 2, "named/0")
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(got, "file")); string(b) != "job 2a\n" {
		t.Errorf("job 2's named/0 holds %q, want its own context", b)
	}
	task2.Finish(solve.Result{}, nil)
	if r := wait(t, done, "Run"); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestLocalContextThatIsNotADirectoryIsRefused(t *testing.T) {
	c, _ := connect(t, &Host{})
	job := testJob(t)
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	job.Solve.LocalContexts = map[string]string{"ok": t.TempDir(), "bad": file}
	if _, err := c.Run(context.Background(), job, nil); err == nil || !strings.Contains(err.Error(), "named local context bad") {
		t.Errorf("err = %v", err)
	}
}

// The agent unpacks only trees of names this version knows, so a host of
// another kiln cannot make it write elsewhere below its work dir.
func TestValidTreeNames(t *testing.T) {
	for name, want := range map[string]bool{
		"context": true, "dockerfile": true, "named/0": true, "named/17": true,
		"": false, "named/": false, "named/x": false, "named/../0": false, "named/0/x": false,
		"/etc": false, "../context": false, "named/-1": false, "named/1234567": false,
	} {
		if got := validTree(name); got != want {
			t.Errorf("validTree(%q) = %t, want %t", name, got, want)
		}
	}
}
