package builds

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// sshRuntime runs builds as scriptRuntime does, after listing, through
// the job's SSHAgent, the keys of every ssh agent the job names: what a
// RUN --mount=type=ssh step would see.
type sshRuntime struct {
	*scriptRuntime
	mu   sync.Mutex
	seen map[string]map[string][]string // build → agent id → fingerprints, or "error: …"
}

func (r *sshRuntime) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, error) {
	got := map[string][]string{}
	for _, id := range job.Solve.SSH {
		got[id] = listAgent(ctx, job.Solve.SSHAgent, id)
	}
	r.mu.Lock()
	r.seen[job.BuildID] = got
	r.mu.Unlock()
	return r.scriptRuntime.Run(ctx, job, sink)
}

func listAgent(ctx context.Context, dial solve.SSHDialer, id string) []string {
	if dial == nil {
		return []string{"error: no dialer"}
	}
	conn, err := dial(ctx, id)
	if err != nil {
		return []string{"error: " + err.Error()}
	}
	defer conn.Close()
	keys, err := agent.NewClient(conn).List()
	if err != nil {
		return []string{"error: " + err.Error()}
	}
	var out []string
	for _, k := range keys {
		out = append(out, ssh.FingerprintSHA256(k))
	}
	return out
}

func (r *sshRuntime) saw(id string) map[string][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[id]
}

// sshService is a Service on f whose runtime is an sshRuntime.
func sshService(t *testing.T, f *fixture) (*Service, *sshRuntime, func()) {
	t.Helper()
	rt := &sshRuntime{scriptRuntime: f.rt, seen: map[string]map[string][]string{}}
	s, err := New(f.cfg, Deps{DB: f.db, Registry: f.reg, Images: f.imgs, Volumes: f.vols, Runtime: rt,
		Auth: f.auth, Policy: f.policy, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			s.Stop(ctx)
		})
	}
	t.Cleanup(stop)
	return s, rt, stop
}

// clientSession is a client's ssh session: the server's end, to hand to
// AttachSSH, and a client end answering "default" from key.
func clientSession(t *testing.T, key testkit.SSHKey) SSHSession {
	t.Helper()
	ring, err := sshrelay.Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	srvEnd, cliEnd := net.Pipe()
	sess, err := sshrelay.Server(srvEnd)
	if err != nil {
		t.Fatal(err)
	}
	go sshrelay.Serve(context.Background(), cliEnd, func(id string) (sshrelay.Handler, error) {
		if id != "default" {
			return nil, fmt.Errorf("no agent %q here", id)
		}
		return func(c net.Conn) { defer c.Close(); agent.ServeAgent(ring, c) }, nil
	})
	t.Cleanup(func() { sess.Close(); cliEnd.Close() })
	return sess
}

// assertNotUnder fails if needle is in any file below dir.
func assertNotUnder(t *testing.T, dir string, needle []byte) {
	t.Helper()
	found, err := testkit.FindBytes(dir, needle)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range found {
		t.Errorf("%s holds the private key", p)
	}
}

// Key files are served to the build from memory, under their id, and
// the build neither deduplicates nor leaves the key anywhere on disk.
func TestSSHKeyFilesServeTheBuildFromMemory(t *testing.T) {
	f := newFixture(t, 2)
	s, rt, _ := sshService(t, f)
	key := testkit.NewSSHKey(t, t.TempDir(), "deploy")
	req := script("ok", 1)
	req.SSHKeys = map[string][][]byte{"deploy": {key.Private}}
	var ids []string
	for range 2 {
		b, err := submit(t, s, principal("a"), req)
		if err != nil {
			t.Fatal(err)
		}
		b = waitStatus(t, s, b.ID, store.StatusSucceeded)
		if b.DedupOf != "" || b.InputHash != "" {
			t.Errorf("a build with ssh keys deduplicated (dedup_of %q, input hash %q)", b.DedupOf, b.InputHash)
		}
		if len(b.Options.SSH) != 1 || b.Options.SSH[0] != (store.SSHAgent{ID: "deploy", Keys: true}) {
			t.Errorf("recorded ssh agents: %+v", b.Options.SSH)
		}
		if got := rt.saw(b.ID)["deploy"]; len(got) != 1 || got[0] != key.Fingerprint {
			t.Errorf("the build's agent deploy listed %v, want %s", got, key.Fingerprint)
		}
		ids = append(ids, b.ID)
	}
	if ids[0] == ids[1] {
		t.Error("the second build is the first")
	}
	assertNotUnder(t, f.data, bytes.TrimSpace(key.Private))
	assertNotUnder(t, f.data, []byte(strings.Split(string(key.Private), "\n")[1]))
}

// A build forwarding its client's agent waits, saying so, until the
// client's ssh session is open, then dials the client's agent through it;
// the session ends with the build.
func TestSSHForwardedAgentWaitsForTheSession(t *testing.T) {
	f := newFixture(t, 1)
	f.cfg.SSHSessionWait = 20 * time.Second
	s, rt, _ := sshService(t, f)
	req := script("ok", 2)
	req.SSH = []string{"default"}
	b, err := submit(t, s, principal("a"), req)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, s, b.ID, "the wait for its ssh session", func(b Build) bool { return b.Phase == sshWaitPhase })
	key := testkit.NewSSHKey(t, t.TempDir(), "client")
	sess := clientSession(t, key)
	attached := make(chan error, 1)
	go func() {
		attached <- s.AttachSSH(context.Background(), principal("a"), b.ID, func() (SSHSession, error) { return sess, nil })
	}()
	b = waitStatus(t, s, b.ID, store.StatusSucceeded)
	if got := rt.saw(b.ID)["default"]; len(got) != 1 || got[0] != key.Fingerprint {
		t.Errorf("the build's agent default listed %v, want %s", got, key.Fingerprint)
	}
	select {
	case err := <-attached:
		if err != nil {
			t.Errorf("AttachSSH: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the session outlived its build")
	}
	select {
	case <-sess.Done():
	default:
		t.Error("the session is still open after the build ended")
	}
	evs, _ := s.Events(context.Background(), b.ID, 0, 1000)
	var said bool
	for _, e := range evs {
		said = said || strings.Contains(e.Event.Message, "waiting for the client's ssh session")
	}
	if !said {
		t.Error("the build's events do not say it waited for the client's ssh session")
	}
	endings(t, s, b.ID)
}

// A build whose client never opens its session fails after the wait,
// saying how to open one; a canceled one stops waiting at once.
func TestSSHWithoutASessionFailsWithTheReason(t *testing.T) {
	f := newFixture(t, 1)
	f.cfg.SSHSessionWait = 300 * time.Millisecond
	s, rt, _ := sshService(t, f)
	req := script("ok", 3)
	req.SSH = []string{"default", "github"}
	b, err := submit(t, s, principal("a"), req)
	if err != nil {
		t.Fatal(err)
	}
	b = waitStatus(t, s, b.ID, store.StatusFailed)
	for _, want := range []string{"default, github", "kiln build --ssh", "/v1/builds/" + b.ID + "/ssh", "Upgrade: kiln-ssh/1"} {
		if !strings.Contains(b.Error, want) {
			t.Errorf("the error lacks %q: %s", want, b.Error)
		}
	}
	if rt.saw(b.ID) != nil {
		t.Error("the build ran without its session")
	}
	endings(t, s, b.ID)

	f.cfg.SSHSessionWait = time.Hour
	s2, _, _ := sshService(t, f)
	req = script("ok", 4)
	req.SSH = []string{"default"}
	b, err = submit(t, s2, principal("a"), req)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, s2, b.ID, "the wait for its ssh session", func(b Build) bool { return b.Phase == sshWaitPhase })
	start := time.Now()
	if _, err := s2.Cancel(context.Background(), principal("a"), b.ID); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("canceling a build waiting for its session took %s", d)
	}
	endings(t, s2, b.ID)
}

// Only the build's own tenant, with build:write, may open its session,
// and only while it runs, forwards an agent and has no session open.
func TestSSHSessionIsTheBuildTenantsAlone(t *testing.T) {
	f := newFixture(t, 1)
	f.cfg.SSHSessionWait = time.Hour
	s, _, _ := sshService(t, f)
	req := script("hold", 5)
	req.SSH = []string{"default"}
	b, err := submit(t, s, principal("a"), req)
	if err != nil {
		t.Fatal(err)
	}
	noOpen := func() (SSHSession, error) {
		t.Error("open was called for a refused session")
		return nil, errors.New("refused")
	}
	other := auth.Principal{Subject: "eve", Tenant: "team-b", Scopes: []auth.Scope{auth.ScopeBuildWrite, auth.ScopeBuildRead}}
	if err := s.AttachSSH(context.Background(), other, b.ID, noOpen); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("another tenant: err = %v, want not found", err)
	}
	reader := principal("a")
	reader.Scopes = []auth.Scope{auth.ScopeBuildRead}
	if err := s.AttachSSH(context.Background(), reader, b.ID, noOpen); !errors.Is(err, errdefs.ErrForbidden) {
		t.Errorf("build:read only: err = %v, want forbidden", err)
	}
	admin := auth.Principal{Subject: "root", Scopes: []auth.Scope{auth.ScopeBuildAdmin, auth.ScopeBuildWrite, auth.ScopeBuildRead}}
	if err := s.AttachSSH(context.Background(), admin, b.ID, noOpen); !errors.Is(err, errdefs.ErrForbidden) {
		t.Errorf("an admin of another tenant: err = %v, want forbidden", err)
	}
	plain, err := submit(t, s, principal("b"), script("ok", 6))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AttachSSH(context.Background(), principal("b"), plain.ID, noOpen); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a build without forwarded agents: err = %v, want conflict", err)
	}

	sess := clientSession(t, testkit.NewSSHKey(t, t.TempDir(), "k"))
	attached := make(chan error, 1)
	go func() {
		attached <- s.AttachSSH(context.Background(), principal("a"), b.ID, func() (SSHSession, error) { return sess, nil })
	}()
	f.started(b.ID)
	if err := s.AttachSSH(context.Background(), principal("a"), b.ID, noOpen); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a second session: err = %v, want conflict", err)
	}
	if _, err := s.Cancel(context.Background(), principal("a"), b.ID); err != nil {
		t.Fatal(err)
	}
	if err := <-attached; err != nil {
		t.Errorf("AttachSSH: %v", err)
	}
	if err := s.AttachSSH(context.Background(), principal("a"), b.ID, noOpen); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("an ended build: err = %v, want conflict", err)
	}
}

// A server restart fails a build with ssh agents instead of rerunning it:
// its keys were in memory, its client's session on the old process.
func TestRestartFailsSSHBuilds(t *testing.T) {
	f := newFixture(t, 1)
	f.cfg.SSHSessionWait = time.Hour
	s1, _, stop1 := sshService(t, f)
	req := script("ok", 7)
	req.SSH = []string{"default"}
	b, err := submit(t, s1, principal("a"), req)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, s1, b.ID, "the wait for its ssh session", func(b Build) bool { return b.Phase == sshWaitPhase })
	stop1()
	s2, rt, _ := sshService(t, f)
	b = waitStatus(t, s2, b.ID, store.StatusFailed)
	if !strings.Contains(b.Error, "ssh agents") || !strings.Contains(b.Error, "submit it again") {
		t.Errorf("error = %q, want the reason", b.Error)
	}
	if rt.saw(b.ID) != nil {
		t.Error("the build ran again")
	}
}

func TestSSHRequestsAreValidated(t *testing.T) {
	f := newFixture(t, 1)
	s, _, _ := sshService(t, f)
	dir := t.TempDir()
	key := testkit.NewSSHKey(t, dir, "k")
	for _, tc := range []struct {
		name string
		edit func(*Request)
		want string
	}{
		{"bad id", func(r *Request) { r.SSH = []string{"a/b"} }, "invalid"},
		{"a path", func(r *Request) { r.SSH = []string{"default=/tmp/agent.sock"} }, "give the agent id only"},
		{"twice", func(r *Request) { r.SSH = []string{"x"}; r.SSHKeys = map[string][][]byte{"x": {key.Private}} }, "given twice"},
		{"not a key", func(r *Request) { r.SSHKeys = map[string][][]byte{"x": {[]byte("hello")}} }, "not an unencrypted"},
		{"too many", func(r *Request) {
			for i := range sshrelay.MaxIDs + 1 {
				r.SSH = append(r.SSH, fmt.Sprint("id", i))
			}
		}, "at most"},
	} {
		req := script("ok", 8)
		tc.edit(&req)
		_, err := submit(t, s, principal("a"), req)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want a 400 saying %q", tc.name, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "PRIVATE KEY") {
			t.Errorf("%s: the error quotes the key", tc.name)
		}
	}
}
