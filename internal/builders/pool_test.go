package builders

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// The runtimes' real builders are tested in internal/runtime/process and
// internal/runtime/vm; here a fake stands at the Keeper seam, over real
// cache volumes.

type fakeRuntime struct {
	starts  atomic.Int32
	oneShot atomic.Int32
	mu      sync.Mutex
	all     []*fakeBuilder
	// lose makes the next n jobs lose their builder.
	lose atomic.Int32
}

func (r *fakeRuntime) Name() string { return "fake" }

func (r *fakeRuntime) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, error) {
	r.oneShot.Add(1)
	return solve.Result{Digest: "sha256:x"}, nil
}

func (r *fakeRuntime) StartBuilder(ctx context.Context, job runtime.Job, sink progress.Sink) (runtime.Builder, error) {
	r.starts.Add(1)
	b := &fakeBuilder{r: r, volume: job.Volume, reusable: true}
	r.mu.Lock()
	r.all = append(r.all, b)
	r.mu.Unlock()
	return b, nil
}

func (r *fakeRuntime) running() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, b := range r.all {
		if !b.stopped.Load() {
			n++
		}
	}
	return n
}

type fakeBuilder struct {
	r        *fakeRuntime
	volume   string
	jobs     []string
	reusable bool
	stopped  atomic.Bool
}

func (b *fakeBuilder) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, error) {
	if b.stopped.Load() {
		return solve.Result{}, errors.New("run on a stopped builder")
	}
	if job.Volume != b.volume {
		return solve.Result{}, fmt.Errorf("job for volume %s on a builder of %s", job.Volume, b.volume)
	}
	b.jobs = append(b.jobs, job.BuildID)
	if b.r.lose.Load() > 0 {
		b.r.lose.Add(-1)
		b.reusable = false
		return solve.Result{}, fmt.Errorf("vm froze: %w", runtime.ErrBuilderLost)
	}
	if job.Solve.BuildArgs["HOLD"] == "1" {
		<-ctx.Done()
		b.reusable = false
		return solve.Result{}, ctx.Err()
	}
	return solve.Result{Digest: "sha256:" + job.BuildID}, nil
}

func (b *fakeBuilder) Reusable() bool             { return b.reusable && !b.stopped.Load() }
func (b *fakeBuilder) Stop(context.Context) error { b.stopped.Store(true); return nil }
func (b *fakeBuilder) MemoryMB() int              { return 512 }

func newPool(t *testing.T, cfg Config, vcfg cachevol.Config) (*Pool, *fakeRuntime, *cachevol.Manager) {
	t.Helper()
	if vcfg.DefaultSize == 0 {
		vcfg.DefaultSize = cachevol.MinSize
	}
	vols, err := cachevol.Open(t.TempDir(), vcfg)
	if err != nil {
		t.Fatal(err)
	}
	rt := &fakeRuntime{}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = time.Minute
	}
	p := New(cfg, rt, vols)
	vols.SetIdleHolder(p)
	t.Cleanup(p.Close)
	return p, rt, vols
}

// build runs one build of scope through the pool as the build service
// does: lease, run, release.
func build(t *testing.T, p *Pool, scope, id string, args map[string]string, mutate ...func(*runtime.Job)) (RunReport, error) {
	t.Helper()
	l, err := p.Acquire(context.Background(), scope, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	job := runtime.Job{BuildID: id, Volume: l.Volume().Path(), Solve: solve.Request{BuildArgs: args}}
	for _, m := range mutate {
		m(&job)
	}
	_, rep, err := l.Run(context.Background(), job, nil)
	return rep, err
}

func TestSecondBuildOfAScopeRunsOnItsBuilder(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	rep1, err := build(t, p, "team-a", "b1", nil)
	if err != nil || rep1.Reused {
		t.Fatalf("first build: reused=%v err=%v", rep1.Reused, err)
	}
	rep2, err := build(t, p, "team-a", "b2", nil)
	if err != nil || !rep2.Reused || rep2.Start != 0 {
		t.Fatalf("second build: %+v err=%v, want it reused with no start", rep2, err)
	}
	if n := rt.starts.Load(); n != 1 {
		t.Errorf("%d builders started for two builds of one scope, want 1", n)
	}
	got := p.List()
	if len(got) != 1 || got[0].Scope != "team-a" || got[0].State != StateIdle || got[0].Builds != 2 {
		t.Errorf("List = %+v", got)
	}
}

func TestBuildersAreNeverSharedAcrossScopes(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	build(t, p, "team-a", "a1", nil)
	rep, _ := build(t, p, "team-b", "b1", nil)
	if rep.Reused || rt.starts.Load() != 2 {
		t.Errorf("team-b's build reused=%v with %d starts: a builder crossed scopes", rep.Reused, rt.starts.Load())
	}
	for _, b := range rt.all {
		if len(b.jobs) != 1 {
			t.Errorf("a builder ran %v", b.jobs)
		}
	}
}

func TestAnotherShapeGetsAFreshBuilder(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	build(t, p, "team-a", "b1", nil)
	rep, err := build(t, p, "team-a", "b2", nil, func(j *runtime.Job) { j.Network = "isolated" })
	if err != nil || rep.Reused || rt.starts.Load() != 2 {
		t.Fatalf("isolated build after an egress one: reused=%v starts=%d err=%v", rep.Reused, rt.starts.Load(), err)
	}
	if !rt.all[0].stopped.Load() {
		t.Error("the builder of the other shape was left running")
	}
	rep, _ = build(t, p, "team-a", "b3", nil, func(j *runtime.Job) { j.Network = "isolated" })
	if !rep.Reused {
		t.Error("a build of the new shape did not reuse the new builder")
	}
}

func TestBuilderInDoubtIsNotKept(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	l, err := p.Acquire(context.Background(), "team-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	_, _, err = l.Run(ctx, runtime.Job{BuildID: "held", Volume: l.Volume().Path(),
		Solve: solve.Request{BuildArgs: map[string]string{"HOLD": "1"}}}, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	l.Release()
	if !rt.all[0].stopped.Load() || len(p.List()) != 0 {
		t.Fatal("a builder whose build was canceled was kept")
	}
	if rep, _ := build(t, p, "team-a", "next", nil); rep.Reused {
		t.Error("the next build reused a builder in doubt")
	}
}

func TestLostBuilderIsReplacedOnce(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	rt.lose.Store(1)
	if _, err := build(t, p, "team-a", "b1", nil); err != nil {
		t.Fatalf("a build whose builder froze once should run again on a fresh one: %v", err)
	}
	if rt.starts.Load() != 2 || !rt.all[0].stopped.Load() {
		t.Errorf("starts=%d, first stopped=%v", rt.starts.Load(), rt.all[0].stopped.Load())
	}
	rt.lose.Store(2)
	if _, err := build(t, p, "team-a", "b2", nil); !errors.Is(err, runtime.ErrBuilderLost) {
		t.Errorf("lost twice: err = %v, want the loss reported", err)
	}
}

func TestIdleTimeoutStopsTheBuilderAndFreesTheVolume(t *testing.T) {
	p, rt, vols := newPool(t, Config{IdleTimeout: 50 * time.Millisecond}, cachevol.Config{})
	build(t, p, "team-a", "b1", nil)
	deadline := time.Now().Add(5 * time.Second)
	for len(p.List()) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle builder was not stopped")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !rt.all[0].stopped.Load() {
		t.Error("builder gone from the list but not stopped")
	}
	v, ok, err := vols.TryAcquire(context.Background(), "team-a")
	if err != nil || !ok {
		t.Fatalf("volume still held after the idle stop: ok=%v err=%v", ok, err)
	}
	v.Release()
}

func TestReuseOffStartsABuilderPerBuild(t *testing.T) {
	vols, err := cachevol.Open(t.TempDir(), cachevol.Config{DefaultSize: cachevol.MinSize})
	if err != nil {
		t.Fatal(err)
	}
	rt := &fakeRuntime{}
	p := New(Config{IdleTimeout: 0}, rt, vols)
	build(t, p, "team-a", "b1", nil)
	build(t, p, "team-a", "b2", nil)
	if rt.oneShot.Load() != 2 || rt.starts.Load() != 0 || len(p.List()) != 0 {
		t.Errorf("idle_timeout 0: one-shot runs %d, starts %d, kept %d", rt.oneShot.Load(), rt.starts.Load(), len(p.List()))
	}
}

func TestMaxWarmStopsTheLeastRecentlyUsedIdleBuilder(t *testing.T) {
	p, rt, _ := newPool(t, Config{MaxWarm: 2}, cachevol.Config{})
	build(t, p, "s1", "b1", nil)
	build(t, p, "s2", "b2", nil)
	build(t, p, "s1", "b3", nil) // s2 is now the least recently used
	build(t, p, "s3", "b4", nil)
	var scopes []string
	for _, b := range p.List() {
		scopes = append(scopes, b.Scope)
	}
	if len(scopes) != 2 || scopes[0] != "s3" || scopes[1] != "s1" {
		t.Errorf("kept %v, want [s3 s1]", scopes)
	}
	if rt.running() != 2 {
		t.Errorf("%d builders running, want 2", rt.running())
	}
}

func TestCacheRemovalStopsAnIdleBuilderButNotABusyOne(t *testing.T) {
	p, rt, vols := newPool(t, Config{}, cachevol.Config{})
	build(t, p, "team-a", "b1", nil)
	if err := vols.Delete(context.Background(), "team-a"); err != nil {
		t.Fatalf("kiln cache rm of a scope with an idle builder: %v", err)
	}
	if !rt.all[0].stopped.Load() || len(p.List()) != 0 {
		t.Error("the idle builder survived the deletion of its volume")
	}

	l, err := p.Acquire(context.Background(), "team-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.Run(context.Background(), runtime.Job{BuildID: "b2", Volume: l.Volume().Path()}, nil); err != nil {
		t.Fatal(err)
	}
	if err := vols.Delete(context.Background(), "team-a"); !errors.Is(err, cachevol.ErrInUse) {
		t.Errorf("delete during a build: err = %v, want ErrInUse", err)
	}
	if rt.all[1].stopped.Load() {
		t.Error("a builder was stopped under its running build")
	}
	l.Release()
}

func TestEvictionStopsIdleBuildersFirst(t *testing.T) {
	p, rt, vols := newPool(t, Config{}, cachevol.Config{MaxCount: 1})
	build(t, p, "old", "b1", nil)
	build(t, p, "new", "b2", nil)
	infos, err := vols.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].Scope != "new" {
		t.Errorf("volumes after eviction: %+v, want only the new scope's", infos)
	}
	if !rt.all[0].stopped.Load() {
		t.Error("the evicted scope's builder is still running")
	}
}

func TestBuildsOfOneScopeTakeTurnsAndTheNextReusesTheBuilder(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	l, err := p.Acquire(context.Background(), "team-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Run(context.Background(), runtime.Job{BuildID: "b1", Volume: l.Volume().Path()}, nil)
	waited := make(chan struct{})
	got := make(chan *Lease)
	go func() {
		l2, err := p.Acquire(context.Background(), "team-a", func() { close(waited) })
		if err != nil {
			t.Error(err)
		}
		got <- l2
	}()
	<-waited
	select {
	case <-got:
		t.Fatal("a second build leased the scope while the first held it")
	case <-time.After(50 * time.Millisecond):
	}
	l.Release()
	l2 := <-got
	defer l2.Release()
	if !l2.WasWarm {
		t.Fatal("the waiting build did not get the scope's builder")
	}
	if _, rep, err := l2.Run(context.Background(), runtime.Job{BuildID: "b2", Volume: l2.Volume().Path()}, nil); err != nil || !rep.Reused {
		t.Errorf("reused=%v err=%v", rep.Reused, err)
	}
	if rt.starts.Load() != 1 {
		t.Errorf("%d starts", rt.starts.Load())
	}
}

func TestStopAndClose(t *testing.T) {
	p, rt, _ := newPool(t, Config{}, cachevol.Config{})
	build(t, p, "s1", "b1", nil)
	build(t, p, "s2", "b2", nil)
	if running, err := p.Stop("s1"); err != nil || running {
		t.Fatalf("stop idle: running=%v err=%v", running, err)
	}
	if _, err := p.Stop("s1"); err == nil {
		t.Error("stopping a scope without a builder succeeded")
	}
	l, _ := p.Acquire(context.Background(), "s2", nil)
	if running, err := p.Stop("s2"); err != nil || !running {
		t.Errorf("stop busy: running=%v err=%v", running, err)
	}
	l.Run(context.Background(), runtime.Job{BuildID: "b3", Volume: l.Volume().Path()}, nil)
	l.Release()
	if rt.running() != 0 || len(p.List()) != 0 {
		t.Errorf("builder of s2 kept after stop was asked during its build")
	}
	build(t, p, "s3", "b4", nil)
	p.Close()
	if rt.running() != 0 {
		t.Errorf("%d builders running after Close", rt.running())
	}
	if _, err := p.Acquire(context.Background(), "s3", nil); err == nil {
		t.Error("Acquire after Close succeeded")
	}
}

// List may be called while builds run (GET /v1/builders, /metrics).
func TestListWhileBuilding(t *testing.T) {
	p, _, _ := newPool(t, Config{}, cachevol.Config{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 20 {
			build(t, p, "team-a", fmt.Sprintf("b%d", i), nil)
		}
	}()
	for {
		select {
		case <-done:
			return
		default:
			p.List()
		}
	}
}
