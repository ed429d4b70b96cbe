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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{Agent: "test"})
	if err != nil {
		t.Fatal(err)
	}
	got := s.Job()
	if string(got.Solve.Secrets["tok"]) != "s3cr3t" || got.Solve.RegistryAuth["kiln:5000"].Password != "p" {
		t.Errorf("memory-only fields did not arrive: secrets=%v auth=%v", got.Solve.Secrets, got.Solve.RegistryAuth)
	}
	if got.CacheDisk != "kiln-cache" || got.GC.MaxUsedSpace != "1GB" || got.Solve.Push[0] != "kiln:5000/app:latest" {
		t.Errorf("job fields lost: %+v", got)
	}
	if got.Solve.ContextDir != treeContext {
		t.Errorf("the host path of the context reached the guest: %q", got.Solve.ContextDir)
	}
	for i := range n {
		s.Emit(progress.Event{Kind: progress.Log, Data: strconv.Itoa(i)})
	}
	s.Logger().Info("agent says hi", "disk", "vdb")
	want := solve.Result{Digest: "sha256:abc", StepsTotal: 4, StepsCached: 3}
	if err := s.Finish(want, nil); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	r := wait(t, done, "Serve")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.res != want {
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

func TestEventsArriveWhileTheBuildRuns(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	rec := &testkit.Recorder{}
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), rec)
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	arrived := rec.Await(progress.VertexStarted, "RUN make")
	s.Emit(progress.Event{Kind: progress.VertexStarted, Name: "RUN make"})
	select {
	case <-arrived:
	case <-time.After(5 * time.Second):
		t.Fatal("an event was held back until the end of the build")
	}
	s.Finish(solve.Result{}, errors.New("build failed: exit code 2"))
	r := wait(t, done, "Serve")
	if r.err == nil || r.err.Error() != "build failed: exit code 2" {
		t.Errorf("Serve error = %v, want the agent's error verbatim", r.err)
	}
}

func TestVersionMismatchIsAClearErrorOnBothSides(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	_, agentErr := accept(context.Background(), guestEnd, AgentOptions{Agent: "kiln-agent old"}, Version+1)
	r := wait(t, done, "Serve")
	for side, err := range map[string]error{"host": r.err, "agent": agentErr} {
		if !errors.Is(err, ErrVersionMismatch) {
			t.Errorf("%s: err = %v, want ErrVersionMismatch", side, err)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, fmt.Sprintf("version %d", Version+1)) || !strings.Contains(msg, "rebuild the builder image") {
			t.Errorf("%s error does not say what is wrong and what to do: %v", side, err)
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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-s.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("agent's context did not end after the host canceled")
	}
	if cause := context.Cause(s.Context()); !errors.Is(cause, ErrCanceledByHost) {
		t.Errorf("cause = %v, want ErrCanceledByHost", cause)
	}
	// The host keeps waiting for the agent to confirm it cleaned up.
	select {
	case r := <-done:
		t.Fatalf("Serve returned before the agent confirmed the cancel: %v", r.err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := s.Finish(solve.Result{StepsTotal: 1}, fmt.Errorf("build canceled: %w", context.Cause(s.Context()))); err != nil {
		t.Errorf("Finish: %v", err)
	}
	r := wait(t, done, "Serve")
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("Serve err = %v, want context.Canceled", r.err)
	}
}

func TestHostGivesUpOnAnAgentThatIgnoresCancel(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := serve(ctx, &Host{CancelGrace: 300 * time.Millisecond}, hostEnd, testJob(t), nil)
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cancel()
	r := wait(t, done, "Serve")
	if !errors.Is(r.err, context.Canceled) || !strings.Contains(r.err.Error(), "did not confirm") {
		t.Errorf("err = %v", r.err)
	}
}

func TestAgentDeathEndsServePromptly(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	done := serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Emit(progress.Event{Kind: progress.VertexStarted, Name: "RUN make"})
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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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

func TestHostDeathEndsAgentContext(t *testing.T) {
	hostEnd, guestEnd := socketpair(t)
	serve(context.Background(), &Host{}, hostEnd, testJob(t), nil)
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hostEnd.Close()
	select {
	case <-s.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("agent did not notice the host went away")
	}
	if cause := context.Cause(s.Context()); !errors.Is(cause, ErrHostGone) {
		t.Errorf("cause = %v, want ErrHostGone", cause)
	}
	if err := s.Finish(solve.Result{}, nil); !errors.Is(err, ErrHostGone) && err == nil {
		t.Errorf("Finish to a dead host: err = %v", err)
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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stop, err := s.ListenTunnels(context.Background())
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
	if _, err := s.OpenTunnel(context.Background(), "egress"); err == nil || !strings.Contains(err.Error(), `no tunnel "egress"`) {
		t.Errorf("unlisted tunnel: err = %v", err)
	}

	stop()
	if _, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		t.Error("the guest still listens after stop")
	}
	s.Finish(solve.Result{}, nil)
	if r := wait(t, done, "Serve"); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestHostRefusesTunnelWithoutDialer(t *testing.T) {
	job := testJob(t)
	job.Tunnels = []Tunnel{{Name: "registry", Listen: "127.0.0.1:5000"}}
	hostEnd, _ := socketpair(t)
	_, err := (&Host{}).Serve(context.Background(), hostEnd, job, nil)
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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Job().Solve.DockerfileDir != treeDockerfile {
		t.Errorf("wire dockerfile dir = %q", s.Job().Solve.DockerfileDir)
	}
	work := t.TempDir()
	req, err := s.FetchContext(context.Background(), work)
	if err != nil {
		t.Fatal(err)
	}
	s.Finish(solve.Result{}, nil)
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
	s, err := Accept(context.Background(), guestEnd, AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.FetchContext(context.Background(), t.TempDir())
	if err == nil {
		t.Fatal("a context with a named pipe arrived")
	}
	s.Finish(solve.Result{}, err)
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
