package builds

// The fast tier's harness: a Service on a real store (SQLite in a temp
// dir), a real registry, real cache volumes (sparse files made by
// mkfs.ext4: no root, no mount) and a scripted runtime. The real runtimes
// are tested in internal/runtime/...; nothing here needs root, buildkitd
// or skopeo.

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// scriptRuntime is a runtime.Runtime whose builds do what their build
// arg SCRIPT says: "" or "ok" pushes a small image to every name the job
// names and succeeds, "fail" fails with "scripted failure", "hold" runs
// until canceled, "gate:NAME" runs until the test opens gate NAME (or is
// canceled). Every run honours ctx at once, as a real runtime must.
type scriptRuntime struct {
	reg *registry.Registry

	mu         sync.Mutex
	started    []string // build ids, in the order they started
	running    int
	maxRunning int
	gates      map[string]chan struct{}
	startedC   chan string
	jobs       []runtime.Job // every job run, in order

	// platforms, if set, answers CheckPlatforms.
	platforms func([]string) error
}

func (r *scriptRuntime) CheckPlatforms(p []string) error {
	if r.platforms == nil {
		return nil
	}
	return r.platforms(p)
}

var _ runtime.Runtime = (*scriptRuntime)(nil)

func newScriptRuntime() *scriptRuntime {
	return &scriptRuntime{gates: map[string]chan struct{}{}, startedC: make(chan string, 100)}
}

func (r *scriptRuntime) Name() string { return "script" }

func (r *scriptRuntime) gate(name string) chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gates[name] == nil {
		r.gates[name] = make(chan struct{})
	}
	return r.gates[name]
}

func (r *scriptRuntime) open(name string) { close(r.gate(name)) }

func (r *scriptRuntime) Run(ctx context.Context, job runtime.Job, _ progress.Sink) (solve.Result, error) {
	r.mu.Lock()
	r.started = append(r.started, job.BuildID)
	r.jobs = append(r.jobs, job)
	r.running++
	r.maxRunning = max(r.maxRunning, r.running)
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.running--
		r.mu.Unlock()
	}()
	r.startedC <- job.BuildID
	script := job.Solve.BuildArgs["SCRIPT"]
	switch {
	case script == "fail":
		return solve.Result{}, errors.New("scripted failure")
	case script == "hold":
		<-ctx.Done()
		return solve.Result{}, ctx.Err()
	case strings.HasPrefix(script, "gate:"):
		select {
		case <-r.gate(strings.TrimPrefix(script, "gate:")):
		case <-ctx.Done():
			return solve.Result{}, ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		return solve.Result{}, err
	}
	var dgst string
	for _, ref := range job.Solve.Push {
		_, name, _ := strings.Cut(ref, "/")
		repo, tag, _ := strings.Cut(name, ":")
		d, err := pushImage(ctx, r.reg, repo, tag, job.BuildID)
		if err != nil {
			return solve.Result{}, err
		}
		dgst = d
	}
	return solve.Result{Digest: dgst, StepsTotal: 1}, nil
}

func (r *scriptRuntime) startOrder() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.started...)
}

// pushImage stores the one-layer image of seed (testkit.NewSeedImage).
func pushImage(ctx context.Context, reg *registry.Registry, repo, tag, seed string) (string, error) {
	img := testkit.NewSeedImage(seed)
	for _, b := range [][]byte{img.Layer, img.Config} {
		if err := reg.PutBlob(ctx, repo, digest.FromBytes(b).String(), int64(len(b)), bytes.NewReader(b)); err != nil {
			return "", err
		}
	}
	return reg.PutManifest(ctx, repo, v1.MediaTypeImageManifest, img.Manifest, tag)
}

// fixture is one data dir's parts; service starts a Service on them, as
// often as a test restarts it.
type fixture struct {
	t      *testing.T
	data   string
	rt     *scriptRuntime
	db     *store.DB
	reg    *registry.Registry
	vols   *cachevol.Manager
	imgs   *images.Service
	auth   *auth.Authority
	policy *access.Policy
	cfg    Config
}

func newFixture(t *testing.T, maxConcurrent int) *fixture {
	t.Helper()
	ctx := context.Background()
	data := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	a, _, err := auth.LoadOrCreate(filepath.Join(data, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	db, err := store.Open(ctx, filepath.Join(data, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	policy, err := access.New(access.Config{RegistryHost: "kiln.test:5000"},
		access.OwnersFunc(func(ctx context.Context, id string) (string, bool, error) { return store.BuildOwner(ctx, db.SQL, id) }))
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(data, "registry"), Authority: a, Grant: policy.GrantRegistry, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	vols, err := cachevol.Open(filepath.Join(data, "cache"), cachevol.Config{DefaultSize: cachevol.MinSize, Stamp: "test", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	conv, err := rootfs.Open(filepath.Join(data, "images"), reg, rootfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conv.Close() })
	imgs := images.New(db, reg, conv, policy, log)
	t.Cleanup(imgs.Close)
	rt := newScriptRuntime()
	rt.reg = reg
	return &fixture{t: t, data: data, rt: rt, db: db, reg: reg, vols: vols, imgs: imgs, auth: a, policy: policy,
		cfg: Config{
			DataDir: data, RegistryHost: "kiln.test:5000", MaxConcurrent: maxConcurrent,
			CPUs: Caps{Default: 1, Max: 2}, MemoryMB: Caps{Default: 512, Max: 1024}, DiskGB: Caps{Default: 1, Max: 2},
			TimeoutSec: Caps{Default: 60, Max: 600}, NetworkDefault: "isolated", NetworkAllowed: []string{"isolated", "egress"},
			CancelGrace: 5 * time.Second,
		}}
}

// service starts a Service on the fixture; it stops when the test ends
// unless the test stops it first (stop is idempotent).
func (f *fixture) service() (*Service, func()) {
	f.t.Helper()
	s, err := New(f.cfg, Deps{DB: f.db, Registry: f.reg, Images: f.imgs, Volumes: f.vols, Runtime: f.rt,
		Auth: f.auth, Policy: f.policy, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		f.t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := s.Stop(ctx); err != nil {
				f.t.Errorf("stop: %v", err)
			}
		})
	}
	f.t.Cleanup(stop)
	return s, stop
}

// principal is a build:write token of tenant team-a using cache scope
// team-a.<scope>.
func principal(scope string) auth.Principal {
	return auth.Principal{Subject: "alice", Tenant: "team-a", CacheScope: "team-a." + scope,
		Scopes: []auth.Scope{auth.ScopeBuildWrite, auth.ScopeBuildRead}}
}

// contextTar is a context with a FROM scratch Dockerfile.
func contextTar() []byte {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for name, body := range map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"} {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
		io.WriteString(tw, body)
	}
	tw.Close()
	return tb.Bytes()
}

// submit uploads the context and submits req as p.
func submit(t *testing.T, s *Service, p auth.Principal, req Request) (Build, error) {
	t.Helper()
	u := s.NewUpload()
	if err := s.ReceiveContext(context.Background(), u, bytes.NewReader(contextTar())); err != nil {
		t.Fatal(err)
	}
	return s.Submit(context.Background(), p, u, req)
}

// script is a request whose run does what SCRIPT says; n keeps inputs
// apart so no two builds deduplicate.
func script(what string, n int) Request {
	return Request{BuildArgs: map[string]string{"SCRIPT": what, "N": fmt.Sprint(n)}}
}

// waitFor polls the build until cond holds.
func waitFor(t *testing.T, s *Service, id, what string, cond func(Build) bool) Build {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := store.GetBuild(context.Background(), s.db.SQL, id)
		if err != nil {
			t.Fatal(err)
		}
		if cond(b) {
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("build %s: waited 20s for %s; it is %s (%s): %s", id, what, b.Status, b.Phase, b.Error)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitStatus(t *testing.T, s *Service, id, status string) Build {
	t.Helper()
	return waitFor(t, s, id, status, func(b Build) bool { return b.Status == status })
}

// started waits until the runtime started build id.
func (f *fixture) started(id string) {
	f.t.Helper()
	for {
		select {
		case got := <-f.rt.startedC:
			if got == id {
				return
			}
		case <-time.After(20 * time.Second):
			f.t.Fatalf("build %s did not start in 20s", id)
		}
	}
}

// endings checks the build's event log: exactly one end event, last, and
// carrying the terminal status the record has.
func endings(t *testing.T, s *Service, id string) {
	t.Helper()
	b, err := store.GetBuild(context.Background(), s.db.SQL, id)
	if err != nil {
		t.Fatal(err)
	}
	if !store.Terminal(b.Status) {
		t.Errorf("build %s is %s, not terminal", id, b.Status)
	}
	// The record turns terminal a moment before its last events are
	// written: wait for the end event (its absence fails below).
	var evs []StoredEvent
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		evs, err = s.Events(context.Background(), id, 0, 10000)
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(evs, func(e StoredEvent) bool { return e.Event.Kind == KindEnd }) || time.Now().After(deadline) {
			break
		}
	}
	var ends, terminal int
	final := false
	for i, e := range evs {
		if final && e.Event.Kind != KindEnd {
			t.Errorf("build %s: event %d (%s %s) follows its terminal status", id, i+1, e.Event.Kind, e.Event.Status)
		}
		if e.Event.Kind == KindEnd {
			ends++
			if i != len(evs)-1 {
				t.Errorf("build %s: end event %d of %d is not the last; then: %+v", id, i+1, len(evs), evs[i+1:])
			}
			if e.Event.Status != b.Status {
				t.Errorf("build %s: end event says %s, record says %s", id, e.Event.Status, b.Status)
			}
		}
		if e.Event.Kind == KindStatus && store.Terminal(e.Event.Status) {
			terminal++
			final = true
		}
	}
	if ends != 1 || terminal != 1 {
		t.Errorf("build %s (%s): %d end events and %d terminal status events, want exactly 1 of each", id, b.Status, ends, terminal)
	}
}
