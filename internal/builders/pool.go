package builders

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// Config bounds the pool.
type Config struct {
	// IdleTimeout is how long a builder stays up after its build; 0 turns
	// reuse off (one builder per build).
	IdleTimeout time.Duration
	// MaxWarm caps builders kept up, idle or running a build; past it the
	// least recently used idle one is stopped. 0 means no cap.
	MaxWarm int
	Logger  *slog.Logger
}

// Volumes is what the pool needs of the cache volume manager.
type Volumes interface {
	Acquire(ctx context.Context, scope string) (*cachevol.Volume, error)
	Scratch(ctx context.Context, sizeBytes int64) (*cachevol.Volume, error)
}

// Info describes one builder the pool keeps.
type Info struct {
	Scope    string    `json:"scope"`
	Runtime  string    `json:"runtime"`
	State    string    `json:"state"` // idle or building
	Started  time.Time `json:"started"`
	LastUsed time.Time `json:"last_used"`
	MemoryMB int       `json:"memory_mb"`
	Builds   int       `json:"builds"`
}

// Builder states in Info.
const (
	StateIdle     = "idle"
	StateBuilding = "building"
)

// Pool keeps at most one builder per cache scope up between the scope's
// builds, and serializes each scope's builds (they share one volume).
type Pool struct {
	cfg    Config
	rt     runtime.Runtime
	keeper runtime.Keeper // nil: the runtime cannot keep builders
	vols   Volumes
	log    *slog.Logger

	mu     sync.Mutex
	scopes map[string]*scope
	closed bool
}

// scope is one cache scope's turn and its builder.
type scope struct {
	busy bool
	// free is closed when busy turns false.
	free chan struct{}
	// warm is the builder and the volume it holds, idle when !busy and
	// lent to the lease when busy.
	warm *warm
	// discard: stop the builder when the current build ends.
	discard bool
}

type warm struct {
	b        runtime.Builder
	vol      *cachevol.Volume
	shape    string
	started  time.Time
	lastUsed time.Time
	builds   int
	timer    *time.Timer
}

// New makes a pool over rt. Reuse needs a runtime that implements
// runtime.Keeper; with any other, every build gets its own builder.
func New(cfg Config, rt runtime.Runtime, vols Volumes) *Pool {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	k, _ := rt.(runtime.Keeper)
	return &Pool{cfg: cfg, rt: rt, keeper: k, vols: vols, log: cfg.Logger, scopes: map[string]*scope{}}
}

// Reuses reports whether builders are kept between builds.
func (p *Pool) Reuses() bool { return p.keeper != nil && p.cfg.IdleTimeout > 0 }

// Lease is one build's turn on a scope: the scope's volume and, when one
// was kept, its running builder. Release it exactly once.
type Lease struct {
	p     *Pool
	scope string // "" for a scratch volume
	vol   *cachevol.Volume
	warm  *warm // the builder, once there is one
	// WasWarm: the scope's builder was already up when the lease began.
	WasWarm bool
}

// Volume is the volume the build runs on.
func (l *Lease) Volume() *cachevol.Volume { return l.vol }

// Scratch leases a one-build volume; its builder is never kept.
func (p *Pool) Scratch(ctx context.Context, sizeBytes int64) (*Lease, error) {
	v, err := p.vols.Scratch(ctx, sizeBytes)
	if err != nil {
		return nil, fmt.Errorf("create scratch volume: %w", err)
	}
	return &Lease{p: p, vol: v}, nil
}

// Acquire waits for scopeName's turn (calling waiting once if it has to)
// and leases its kept builder or, without one, its volume.
func (p *Pool) Acquire(ctx context.Context, scopeName string, waiting func()) (*Lease, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errors.New("the builder pool is shutting down")
		}
		st := p.scopes[scopeName]
		if st == nil {
			st = &scope{free: make(chan struct{})}
			p.scopes[scopeName] = st
		}
		if !st.busy {
			st.busy = true
			w := st.warm
			if w != nil && w.timer != nil {
				w.timer.Stop()
			}
			p.mu.Unlock()
			if w != nil {
				return &Lease{p: p, scope: scopeName, vol: w.vol, warm: w, WasWarm: true}, nil
			}
			v, err := p.vols.Acquire(ctx, scopeName)
			if err != nil {
				p.endTurn(scopeName, nil)
				return nil, fmt.Errorf("attach cache volume of scope %q: %w", scopeName, err)
			}
			return &Lease{p: p, scope: scopeName, vol: v}, nil
		}
		free := st.free
		p.mu.Unlock()
		if waiting != nil {
			waiting()
			waiting = nil
		}
		select {
		case <-free:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// RunReport says how a Run got its builder.
type RunReport struct {
	// Reused: the job ran on a builder kept from an earlier build.
	Reused bool
	// Start is what starting a builder took (0 when reused).
	Start time.Duration
}

// Run runs job on the lease's builder: the kept one when its shape fits,
// else a new one (kept afterwards when reuse is on). A builder lost under
// the job (a frozen VM) is replaced once.
func (l *Lease) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, RunReport, error) {
	p := l.p
	var rep RunReport
	if sink == nil {
		sink = progress.Discard
	}
	if l.scope == "" || !p.Reuses() {
		res, err := p.rt.Run(ctx, job, sink)
		return res, rep, err
	}
	shape := runtime.ShapeOf(job)
	if w := l.warm; w != nil {
		switch {
		case w.shape != shape:
			sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
				Message: "the scope's warm builder was started for other settings (network, CPUs, memory or registries); starting a fresh one"})
			l.stopBuilder(ctx)
		case !w.b.Reusable():
			sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
				Message: "the scope's warm builder stopped responding while idle; starting a fresh one"})
			l.stopBuilder(ctx)
		}
	}
	for attempt := 1; ; attempt++ {
		if l.warm == nil {
			if err := l.start(ctx, job, shape, sink, &rep); err != nil {
				return solve.Result{}, rep, err
			}
		} else if attempt == 1 {
			rep.Reused = true
			p.mu.Lock()
			builds := l.warm.builds
			p.mu.Unlock()
			sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
				Message: fmt.Sprintf("reusing the scope's warm builder (up %s, %d builds so far)", time.Since(l.warm.started).Round(time.Second), builds)})
		}
		res, err := l.warm.b.Run(ctx, job, sink)
		p.mu.Lock() // List reads these
		l.warm.builds++
		l.warm.lastUsed = time.Now()
		p.mu.Unlock()
		if err == nil || !errors.Is(err, runtime.ErrBuilderLost) || ctx.Err() != nil || attempt == 2 {
			return res, rep, err
		}
		p.log.Warn("builder lost under a build; running it again on a fresh builder", "scope", l.scope, "build", job.BuildID, "err", err)
		sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
			Message: "the builder stopped responding; running the build again on a fresh builder"})
		l.stopBuilder(ctx)
	}
}

// start starts a builder for the lease, making room under MaxWarm first.
func (l *Lease) start(ctx context.Context, job runtime.Job, shape string, sink progress.Sink, rep *RunReport) error {
	l.p.makeRoom()
	began := time.Now()
	b, err := l.p.keeper.StartBuilder(ctx, job, sink)
	if err != nil {
		return err
	}
	rep.Start = time.Since(began)
	now := time.Now()
	l.warm = &warm{b: b, vol: l.vol, shape: shape, started: now, lastUsed: now}
	l.p.mu.Lock()
	l.p.scopes[l.scope].warm = l.warm
	l.p.mu.Unlock()
	return nil
}

// stopBuilder stops the lease's builder; the volume stays leased.
func (l *Lease) stopBuilder(ctx context.Context) {
	w := l.warm
	l.warm = nil
	l.p.mu.Lock()
	l.p.scopes[l.scope].warm = nil
	l.p.mu.Unlock()
	if err := w.b.Stop(context.WithoutCancel(ctx)); err != nil {
		l.p.log.Error("stop builder", "scope", l.scope, "err", err)
	}
}

// Release ends the lease. A builder that may be reused stays up for
// IdleTimeout, holding the volume; otherwise it is stopped and the volume
// released.
func (l *Lease) Release() {
	p := l.p
	if l.scope == "" {
		if err := l.vol.Release(); err != nil {
			p.log.Error("release scratch volume", "err", err)
		}
		return
	}
	w := l.warm
	p.mu.Lock()
	st := p.scopes[l.scope]
	keep := w != nil && p.Reuses() && !p.closed && !st.discard && w.b.Reusable()
	p.mu.Unlock()
	if !keep {
		if w != nil {
			if err := w.b.Stop(context.Background()); err != nil {
				p.log.Error("stop builder", "scope", l.scope, "err", err)
			}
		}
		if err := l.vol.Release(); err != nil {
			p.log.Error("release cache volume", "scope", l.scope, "err", err)
		}
		p.endTurn(l.scope, nil)
		return
	}
	p.endTurn(l.scope, w)
	p.trim()
}

// endTurn ends the scope's turn, leaving w (nil: nothing) as its idle
// builder, and wakes whoever waits for the scope.
func (p *Pool) endTurn(name string, w *warm) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.scopes[name]
	st.busy, st.discard, st.warm = false, false, w
	close(st.free)
	st.free = make(chan struct{})
	if w != nil {
		w.timer = time.AfterFunc(p.cfg.IdleTimeout, func() { p.expire(name, w) })
		return
	}
	delete(p.scopes, name) // waiters hold the old free channel and retry
}

// expire stops w if it is still the scope's idle builder.
func (p *Pool) expire(name string, w *warm) {
	if p.takeIdle(name, w) {
		p.log.Info("stopping idle builder", "scope", name, "idle_timeout", p.cfg.IdleTimeout)
		p.stopIdle(name, w)
	}
}

// takeIdle claims the scope's turn from its idle builder w (any idle one
// when w is nil), so no build can lease it while it stops.
func (p *Pool) takeIdle(name string, w *warm) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.scopes[name]
	if st == nil || st.busy || st.warm == nil || w != nil && st.warm != w {
		return false
	}
	if st.warm.timer != nil {
		st.warm.timer.Stop()
	}
	st.busy = true
	return true
}

// stopIdle stops the scope's builder after takeIdle and ends the turn.
func (p *Pool) stopIdle(name string, w *warm) {
	p.mu.Lock()
	if w == nil {
		w = p.scopes[name].warm
	}
	p.mu.Unlock()
	if err := w.b.Stop(context.Background()); err != nil {
		p.log.Error("stop idle builder", "scope", name, "err", err)
	}
	if err := w.vol.Release(); err != nil {
		p.log.Error("release cache volume", "scope", name, "err", err)
	}
	p.endTurn(name, nil)
}

// ReleaseIdle stops scope's builder if it is idle (cachevol.IdleHolder):
// eviction and `kiln cache rm` call it before touching the volume.
func (p *Pool) ReleaseIdle(scope string) bool {
	if !p.takeIdle(scope, nil) {
		return false
	}
	p.log.Info("stopping idle builder to free its cache volume", "scope", scope)
	p.stopIdle(scope, nil)
	return true
}

// Stop stops scope's builder: at once when idle, when its build ends
// otherwise (running reports that).
func (p *Pool) Stop(scope string) (running bool, err error) {
	if p.ReleaseIdle(scope) {
		return false, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.scopes[scope]
	if st == nil || st.warm == nil {
		return false, errdefs.NotFound("scope %s has no warm builder (kiln builders ls lists them)", errdefs.Quote(scope))
	}
	st.discard = true
	return true, nil
}

// makeRoom stops least recently used idle builders until one more fits
// under MaxWarm.
func (p *Pool) makeRoom() { p.shrinkTo(p.cfg.MaxWarm - 1) }

// trim stops least recently used idle builders past MaxWarm.
func (p *Pool) trim() { p.shrinkTo(p.cfg.MaxWarm) }

func (p *Pool) shrinkTo(n int) {
	if p.cfg.MaxWarm <= 0 {
		return
	}
	for {
		p.mu.Lock()
		count, lru, lruName := 0, (*warm)(nil), ""
		for name, st := range p.scopes {
			if st.warm == nil {
				continue
			}
			count++
			if !st.busy && (lru == nil || st.warm.lastUsed.Before(lru.lastUsed)) {
				lru, lruName = st.warm, name
			}
		}
		p.mu.Unlock()
		if count <= n || lru == nil {
			return
		}
		if p.takeIdle(lruName, lru) {
			p.log.Info("stopping least recently used idle builder to make room", "scope", lruName, "max_warm", p.cfg.MaxWarm)
			p.stopIdle(lruName, lru)
		}
	}
}

// List describes the builders kept up, most recently used first.
func (p *Pool) List() []Info {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Info
	for name, st := range p.scopes {
		w := st.warm
		if w == nil {
			continue
		}
		state := StateIdle
		if st.busy {
			state = StateBuilding
		}
		out = append(out, Info{Scope: name, Runtime: p.rt.Name(), State: state, Started: w.started,
			LastUsed: w.lastUsed, MemoryMB: w.b.MemoryMB(), Builds: w.builds})
	}
	slices.SortFunc(out, func(a, b Info) int { return b.LastUsed.Compare(a.LastUsed) })
	return out
}

// Close stops every idle builder and makes builds that end from now on
// stop theirs; call it after the build service stopped its builds.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	var names []string
	for name, st := range p.scopes {
		if st.warm != nil && !st.busy {
			names = append(names, name)
		}
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, name := range names {
		if p.takeIdle(name, nil) {
			wg.Go(func() { p.stopIdle(name, nil) })
		}
	}
	wg.Wait()
}
