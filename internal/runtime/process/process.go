package process

import (
	"context"
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

var _ runtime.Runtime = (*Runtime)(nil)

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
	if sink == nil {
		sink = progress.Discard
	}
	if !buildIDPattern.MatchString(job.BuildID) {
		return res, fmt.Errorf("process runtime: build id %q must be 1-64 letters, digits, '_', '.', '-'", job.BuildID)
	}
	if job.Volume == "" {
		return res, fmt.Errorf("process runtime: build %s has no volume", job.BuildID)
	}
	if err := r.CheckNetwork(job.Network, job.AllowedDomains); err != nil {
		return res, err
	}
	log := r.log.With("build", job.BuildID)

	dir := filepath.Join(r.cfg.StateDir, job.BuildID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return res, fmt.Errorf("process runtime: %s exists: build %s is already running here, or a crash left it behind (restart kiln to reap it)", dir, job.BuildID)
		}
		return res, fmt.Errorf("process runtime: create build state dir: %w", err)
	}

	var (
		vol    *attachment
		daemon *buildkitd.Daemon
	)
	defer func() {
		// Cleanup must finish even though ctx may be canceled already.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		var errs []error
		if daemon != nil {
			if e := daemon.Stop(cctx); e != nil {
				errs = append(errs, e)
			}
		}
		if vol != nil {
			if e := vol.release(); e != nil {
				errs = append(errs, e)
			}
		}
		if e := removeStateDir(dir); e != nil {
			errs = append(errs, e)
		}
		if cerr := errors.Join(errs...); cerr != nil {
			log.Error("process runtime: cleanup failed", "err", cerr)
			err = errors.Join(err, fmt.Errorf("process runtime: clean up build %s: %w", job.BuildID, cerr))
		}
	}()

	vol, err = attachVolume(ctx, job.Volume, filepath.Join(dir, "root"))
	if err != nil {
		return res, fmt.Errorf("process runtime: %w", err)
	}
	if err := writeState(dir, buildState{Volume: vol.file, Loop: vol.device}); err != nil {
		return res, err
	}
	if vol.discarded {
		sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(), Message: buildkitd.DiscardedUnclean})
	}

	sink.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseStartingBuildkitd})
	daemon, err = buildkitd.Start(ctx, buildkitd.Config{
		Binary:             r.cfg.BuildkitdPath,
		Root:               vol.mountPoint,
		Dir:                dir,
		Runc:               r.cfg.RuncPath,
		GC:                 buildkitd.GCPolicy(job.GC),
		InsecureRegistries: job.InsecureRegistries,
		CgroupParent:       cgroupName(r.cfg.StateDir, job.BuildID),
		StepMemoryBytes:    int64(job.MemoryMB) << 20,
		MaxParallelism:     job.CPUs,
		// BuildKit's build history keeps every step's output unmasked on
		// the volume; a step that prints a secret would leave it on disk.
		// kiln keeps its own events, so history is off.
		NoHistory: true,
		Logger:    log,
	})
	if err != nil {
		return res, fmt.Errorf("process runtime: %w", err)
	}

	sink.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseSolving})
	res, err = solve.Run(ctx, daemon.Client(), job.Solve, sink)
	if err != nil && ctx.Err() == nil {
		select {
		case <-daemon.Exited():
			err = fmt.Errorf("%w\nbuildkitd exited during the build; its output:\n%s", err, daemon.StderrTail())
		default:
		}
	}
	return res, err
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
