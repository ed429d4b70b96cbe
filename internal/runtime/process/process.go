package process

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// Config configures the process runtime.
type Config struct {
	// BuildkitdPath is the buildkitd binary.
	BuildkitdPath string
	// StateDir holds one directory per running build (mount point, socket,
	// config). It must belong to this Runtime alone: New reaps whatever a
	// crashed predecessor left in it.
	StateDir string
	// RuncPath is the runc binary; empty means "runc" on PATH, then
	// /usr/sbin/runc.
	RuncPath string
	Logger   *slog.Logger
}

// Runtime runs each build's buildkitd as a host process on the build's
// loop-mounted cache volume. It trusts the Dockerfile as much as the host
// trusts root processes: use it for development and trusted builders.
type Runtime struct {
	cfg Config
	log *slog.Logger
}

var (
	_ runtime.Runtime = (*Runtime)(nil)
	_ runtime.Keeper  = (*Runtime)(nil)
)

// Phases the runtime reports through progress.Phase events.
const (
	PhaseStartingBuildkitd = "starting buildkitd"
	PhaseSolving           = "solving"
)

// New checks the host has what the runtime needs and reaps leftovers of a
// previous, crashed server from cfg.StateDir.
func New(cfg Config) (*Runtime, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("process runtime: needs root to loop-mount cache volumes and run buildkitd; run kiln as root or use the vm runtime")
	}
	if cfg.BuildkitdPath == "" {
		return nil, errors.New("process runtime: buildkitd path is empty; build it with `go build -o bin/buildkitd github.com/moby/buildkit/cmd/buildkitd`")
	}
	if fi, err := os.Stat(cfg.BuildkitdPath); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("process runtime: buildkitd %s is not an executable file", cfg.BuildkitdPath)
	}
	runc, err := findRunc(cfg.RuncPath)
	if err != nil {
		return nil, err
	}
	cfg.RuncPath = runc
	for _, tool := range []string{"losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("process runtime: %s not found on PATH; install util-linux", tool)
		}
	}
	stateDir, err := runtime.MakeStateDir("process runtime", cfg.StateDir)
	if err != nil {
		return nil, err
	}
	cfg.StateDir = stateDir
	if err := Reap(context.Background(), cfg.StateDir, cfg.Logger); err != nil {
		// Only the leftover builds' own dirs are affected; new builds get
		// fresh ones, so keep serving and let the operator look.
		cfg.Logger.Warn("process runtime: could not fully clean up after a previous run", "state_dir", cfg.StateDir, "err", err)
	}
	return &Runtime{cfg: cfg, log: cfg.Logger}, nil
}

func findRunc(p string) (string, error) {
	if p == "" {
		if lp, err := exec.LookPath("runc"); err == nil {
			p = lp
		} else {
			p = "/usr/sbin/runc"
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return "", fmt.Errorf("process runtime: runc not found at %s; install it (`apt-get install -y runc`) or set RuncPath", p)
	}
	return p, nil
}

// Name is "process".
func (r *Runtime) Name() string { return "process" }

var buildIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// buildState is persisted next to a running build so Reap can undo it after
// a crash.
type buildState struct {
	Volume string `json:"volume"`
	Loop   string `json:"loop"`
}

const stateFileName = "state.json"

// Run attaches job.Volume, starts a buildkitd on it, solves job.Solve and
// tears everything down again before returning, also when ctx is canceled.
func (r *Runtime) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (res solve.Result, err error) {
	b, err := r.start(ctx, job, sink)
	if err != nil {
		return res, err
	}
	defer func() {
		if e := b.Stop(ctx); e != nil {
			err = errors.Join(err, e)
		}
	}()
	return b.Run(ctx, job, sink)
}

// StartBuilder attaches job.Volume and starts a buildkitd on it that takes
// jobs of job's shape until Stop (runtime.Keeper).
func (r *Runtime) StartBuilder(ctx context.Context, job runtime.Job, sink progress.Sink) (runtime.Builder, error) {
	b, err := r.start(ctx, job, sink)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// builder is one buildkitd on one mounted volume, kept across jobs. Its
// state dir is named for the builder, not a build: it outlives builds.
type builder struct {
	r      *Runtime
	id     string
	dir    string
	shape  string
	mem    int
	log    *slog.Logger
	vol    *attachment
	daemon *buildkitd.Daemon

	mu       sync.Mutex
	reusable bool
	stopped  bool
	stopErr  error
}

func (r *Runtime) start(ctx context.Context, job runtime.Job, sink progress.Sink) (b *builder, err error) {
	if sink == nil {
		sink = progress.Discard
	}
	if !buildIDPattern.MatchString(job.BuildID) {
		return nil, fmt.Errorf("process runtime: build id %q must be 1-64 letters, digits, '_', '.', '-'", job.BuildID)
	}
	if job.Volume == "" {
		return nil, fmt.Errorf("process runtime: build %s has no volume", job.BuildID)
	}
	if err := r.CheckNetwork(job.Network, job.AllowedDomains); err != nil {
		return nil, err
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("process runtime: name builder: %w", err)
	}
	id := "w-" + hex.EncodeToString(rnd[:])
	b = &builder{r: r, id: id, dir: filepath.Join(r.cfg.StateDir, id), shape: runtime.ShapeOf(job),
		mem: job.MemoryMB, log: r.log.With("builder", id, "first_build", job.BuildID), reusable: true}
	if err := os.Mkdir(b.dir, 0o700); err != nil {
		return nil, fmt.Errorf("process runtime: create builder state dir: %w", err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, b.Stop(ctx))
		}
	}()

	b.vol, err = attachVolume(ctx, job.Volume, filepath.Join(b.dir, "root"))
	if err != nil {
		return b, fmt.Errorf("process runtime: %w", err)
	}
	if err := writeState(b.dir, buildState{Volume: b.vol.file, Loop: b.vol.device}); err != nil {
		return b, err
	}
	if b.vol.discarded {
		sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(), Message: buildkitd.DiscardedUnclean})
	}

	sink.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseStartingBuildkitd})
	b.daemon, err = buildkitd.Start(ctx, buildkitd.Config{
		Binary:             r.cfg.BuildkitdPath,
		Root:               b.vol.mountPoint,
		Dir:                b.dir,
		Runc:               r.cfg.RuncPath,
		GC:                 buildkitd.GCPolicy(job.GC),
		InsecureRegistries: job.InsecureRegistries,
		Entitlements:       job.Entitlements,
		CgroupParent:       cgroupName(r.cfg.StateDir, id),
		StepMemoryBytes:    int64(job.MemoryMB) << 20,
		MaxParallelism:     job.CPUs,
		// BuildKit's build history keeps every step's output unmasked on
		// the volume; a step that prints a secret would leave it on disk.
		// kiln keeps its own events, so history is off.
		NoHistory: true,
		Logger:    b.log,
	})
	if err != nil {
		return b, fmt.Errorf("process runtime: %w", err)
	}
	return b, nil
}

// Run solves one job on the builder's buildkitd. The job's secrets,
// registry credentials and context travel in its own BuildKit session,
// which ends with the solve.
func (b *builder) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (res solve.Result, err error) {
	if sink == nil {
		sink = progress.Discard
	}
	b.mu.Lock()
	ok := b.reusable && !b.stopped
	b.mu.Unlock()
	switch {
	case !ok:
		return res, fmt.Errorf("process runtime: builder %s cannot take another build (stopped, or its last build ended in doubt)", b.id)
	case runtime.ShapeOf(job) != b.shape:
		return res, fmt.Errorf("process runtime: build %s has another shape than builder %s was started with", job.BuildID, b.id)
	}
	sink.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseSolving})
	res, err = solve.Run(ctx, b.daemon.Client(), job.Solve, sink)
	exited := false
	select {
	case <-b.daemon.Exited():
		exited = true
	default:
	}
	if err != nil && exited && ctx.Err() == nil {
		err = fmt.Errorf("%w\nbuildkitd exited during the build; its output:\n%s", err, b.daemon.StderrTail())
	}
	// A canceled or timed-out solve may leave steps behind in buildkitd;
	// only a build that ran to its end leaves the builder fit for the next.
	b.mu.Lock()
	b.reusable = !exited && ctx.Err() == nil
	b.mu.Unlock()
	return res, err
}

// Reusable reports whether the last job ended on its own, with buildkitd
// still running.
func (b *builder) Reusable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.reusable || b.stopped {
		return false
	}
	select {
	case <-b.daemon.Exited():
		return false
	default:
		return true
	}
}

// MemoryMB is the builder's step memory limit.
func (b *builder) MemoryMB() int { return b.mem }

// Stop stops buildkitd, releases the volume and removes the state dir.
func (b *builder) Stop(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return b.stopErr
	}
	b.stopped = true
	// Cleanup must finish even though ctx may be canceled already.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	var errs []error
	if b.daemon != nil {
		if e := b.daemon.Stop(cctx); e != nil {
			errs = append(errs, e)
		}
	}
	if b.vol != nil {
		if e := b.vol.release(); e != nil {
			errs = append(errs, e)
		}
	}
	if e := removeStateDir(b.dir); e != nil {
		errs = append(errs, e)
	}
	if cerr := errors.Join(errs...); cerr != nil {
		b.log.Error("process runtime: cleanup failed", "err", cerr)
		b.stopErr = fmt.Errorf("process runtime: stop builder %s: %w", b.id, cerr)
	}
	return b.stopErr
}

// cgroupName is the cgroup parent of one build's steps; the state dir hash
// keeps two kiln instances on one host apart.
func cgroupName(stateDir, buildID string) string {
	sum := sha256.Sum256([]byte(stateDir))
	return "kiln-" + hex.EncodeToString(sum[:4]) + "-" + buildID
}

func writeState(dir string, st buildState) error {
	data, _ := json.Marshal(st)
	if err := os.WriteFile(filepath.Join(dir, stateFileName), data, 0o600); err != nil {
		return fmt.Errorf("process runtime: record build state: %w", err)
	}
	return nil
}

// removeStateDir deletes a build's state dir, but never while anything is
// mounted below it: that would delete the cache volume's contents.
func removeStateDir(dir string) error {
	mounted, err := buildkitd.MountsUnder(dir)
	if err != nil {
		return err
	}
	if len(mounted) > 0 {
		return fmt.Errorf("not removing %s: %v still mounted", dir, mounted)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove build state dir: %w", err)
	}
	return nil
}

// CheckNetwork refuses every network mode but unrestricted egress: steps
// share the host's network here, so anything narrower would silently be
// wider. kiln asks at submission, so such a build is refused at once.
func (r *Runtime) CheckNetwork(mode string, allowedDomains []string) error {
	if (mode != "" && mode != "egress") || len(allowedDomains) > 0 {
		return fmt.Errorf("the process runtime cannot confine RUN steps: they use the host network, so network %q with %d allowed domains cannot be enforced; build with --network egress and no --allow-domain, or ask the operator for the vm runtime", mode, len(allowedDomains))
	}
	return nil
}
