package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// Env is where the agent finds things. In the builder VM it is fixed by
// the image (see VMEnv); tests point it at temp dirs and a loop device.
type Env struct {
	// Buildkitd and Runc are the binaries buildkitd runs with.
	Buildkitd string
	Runc      string
	// Mount is where the cache volume is mounted and buildkitd's root
	// (/var/lib/buildkit in the VM).
	Mount string
	// StateDir holds buildkitd's socket, config and temp files. It must not
	// be on the volume, and its path must be short (unix socket limit).
	StateDir string
	// Disks maps a disk serial to a device path and takes precedence over
	// the lookup in /sys/block/*/serial. Tests pass a loop device here.
	Disks map[string]string
	// DiskWait bounds the wait for the cache disk to show up (default 10s).
	DiskWait time.Duration
	// MountCgroup mounts cgroup2 on /sys/fs/cgroup if it is not there yet.
	// Set it in the VM only; a host has its own.
	MountCgroup bool
	// CgroupParent is the cgroup build steps run under (default "kiln").
	CgroupParent string
	// ResolvConf is the file the agent writes the resolver of a job's NIC
	// to (the image's /etc/resolv.conf links to /run/resolv.conf).
	ResolvConf string
	// Hosts is the file the agent writes the guest's host names to (the
	// image's /etc/hosts links to /run/hosts); empty: leave /etc/hosts
	// alone, and refuse jobs whose tunnels need names.
	Hosts string
	// Agent names the agent and its version in the hello.
	Agent string
	// BinfmtErrors is the file kiln-init writes failed emulator
	// registrations to; jobs for foreign platforms are refused with
	// them (platforms.go). Empty: no check.
	BinfmtErrors string
	// Logger is the local log (the VM console). Records also go to the host.
	Logger *slog.Logger
}

// VMEnv is the Env of the builder VM's image.
func VMEnv(agentVersion string) Env {
	return Env{
		Buildkitd:   "/usr/bin/buildkitd",
		Runc:        "/usr/sbin/runc",
		Mount:       "/var/lib/buildkit",
		StateDir:    "/run/kiln",
		MountCgroup: true,
		ResolvConf:  "/run/resolv.conf",
		Hosts:       "/run/hosts",
		Agent:       "kiln-agent " + agentVersion,
		// cmd/kiln-init's binfmtErrors.
		BinfmtErrors: "/run/kiln-binfmt.err",
	}
}

// Phases the agent reports through progress.Phase events; the same names
// the process runtime uses, so a build looks alike on either runtime.
const (
	PhaseStartingBuildkitd = "starting buildkitd"
	PhaseSolving           = "solving"
)

// workDirName is the directory on the volume a job's build context is
// unpacked into. It lives on the volume, not in guest RAM, because contexts
// can be large; it is removed when the job ends and before the volume is
// released.
const workDirName = "kiln-context"

// Run serves one session over conn, the guest end of the host channel: it
// says hello and receives the builder setup, mounts the cache volume at
// env.Mount and starts buildkitd on it (reporting the setup's outcome),
// then runs the host's jobs one after another, each with its own context,
// secrets, tunnels and events, until the host releases the builder or goes
// away. Then it stops buildkitd and unmounts the volume, so the volume is
// clean whatever happens next. A failed setup is torn down the same way
// before it is reported.
//
// It returns nil after a clean release, else what went wrong: the setup's
// error, the host's loss (guest.ErrHostGone), a failed teardown.
func Run(ctx context.Context, conn io.ReadWriteCloser, env Env) error {
	if env.Logger == nil {
		env.Logger = slog.Default()
	}
	s, err := guest.Accept(ctx, conn, guest.AgentOptions{Agent: env.Agent, Logger: env.Logger})
	if err != nil {
		return fmt.Errorf("agent: connect to the host: %w", err)
	}
	defer s.Close()
	setup, err := s.Setup(ctx)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	b := &builder{env: env, setup: setup.Setup(), log: s.Logger()}
	// A broken image is reported to the host as the setup's error rather
	// than left for it to find as a silent agent.
	setupErr := b.env.check()
	if setupErr == nil {
		setupErr = b.start(ctx, setup)
	}
	if setupErr != nil {
		setupErr = errors.Join(setupErr, b.teardown(ctx))
		if err := setup.Finish(solve.Result{}, setupErr); err != nil {
			return errors.Join(setupErr, fmt.Errorf("agent: %w", err))
		}
		return setupErr
	}
	if err := setup.Finish(solve.Result{}, nil); err != nil {
		return errors.Join(fmt.Errorf("agent: %w", err), b.teardown(ctx))
	}

	var endErr error
	for {
		task, err := s.Next(ctx)
		if errors.Is(err, guest.ErrReleased) {
			break
		}
		if err != nil {
			endErr = fmt.Errorf("agent: waiting for the next job: %w", err)
			break
		}
		res, jobErr := b.job(ctx, task)
		if why := b.broken(); why != nil {
			task.MarkBroken(why)
		}
		if err := task.Finish(res, jobErr); err != nil {
			// The host is gone; Next says so next.
			b.log.Warn("could not deliver a job's result", "build", task.Job().BuildID, "err", err)
		}
	}
	teardownErr := b.teardown(ctx)
	if teardownErr != nil {
		b.log.Error("releasing the builder failed", "err", teardownErr)
	}
	if endErr != nil {
		return errors.Join(endErr, teardownErr)
	}
	if err := s.Released(teardownErr); err != nil {
		return errors.Join(teardownErr, fmt.Errorf("agent: %w", err))
	}
	return teardownErr
}

func (env *Env) check() error {
	for _, f := range []struct{ name, value string }{
		{"buildkitd binary", env.Buildkitd},
		{"runc binary", env.Runc},
		{"mount point", env.Mount},
		{"state dir", env.StateDir},
	} {
		if f.value == "" {
			return fmt.Errorf("builder image: agent %s is not set", f.name)
		}
	}
	if env.DiskWait == 0 {
		env.DiskWait = 10 * time.Second
	}
	if env.CgroupParent == "" {
		env.CgroupParent = "kiln"
	}
	return nil
}

// builder is the session's volume and buildkitd, set up once and used by
// every job.
type builder struct {
	env   Env
	setup guest.Setup
	log   *slog.Logger

	mounted bool
	daemon  *buildkitd.Daemon
	// jobBroken is why a job left the builder unfit for the next one.
	jobBroken error
}

// start sets the builder up: volume, network card, buildkitd. What it got
// to is torn down by teardown.
func (b *builder) start(parent context.Context, task *guest.Task) error {
	// The setup stops when the agent's caller stops it or the host cancels
	// (or disappears).
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	stopFollow := context.AfterFunc(task.Context(), func() { cancel(context.Cause(task.Context())) })
	defer stopFollow()
	env, setup, log := b.env, b.setup, b.log

	switch setup.Network {
	case "", "host", "default":
	default:
		return fmt.Errorf("network %q is not supported; build steps share the builder VM's network", setup.Network)
	}
	if env.MountCgroup {
		if err := ensureCgroup2(); err != nil {
			return err
		}
	}
	dev, err := findDisk(ctx, setup.CacheDisk, env)
	if err != nil {
		return err
	}
	started := time.Now()
	discarded, err := mountVolume(dev, env.Mount)
	if err != nil {
		return err
	}
	b.mounted = true
	log.Info("cache volume mounted", "device", dev, "at", env.Mount, "took", time.Since(started).Round(time.Millisecond), "discarded", discarded)
	if discarded {
		task.Emit(progress.Event{Kind: progress.Message, Time: time.Now(), Message: buildkitd.DiscardedUnclean})
	}
	// A crashed earlier session may have left its context behind.
	if err := os.RemoveAll(filepath.Join(env.Mount, workDirName)); err != nil {
		return fmt.Errorf("remove stale build context: %w", err)
	}
	if setup.NIC != nil {
		started = time.Now()
		if err := configureNIC(ctx, *setup.NIC, env.ResolvConf); err != nil {
			return err
		}
		log.Info("network interface configured", "address", setup.NIC.Address, "took", time.Since(started).Round(time.Millisecond))
	}

	task.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseStartingBuildkitd})
	if err := os.MkdirAll(env.StateDir, 0o700); err != nil {
		return fmt.Errorf("create buildkitd state dir: %w", err)
	}
	started = time.Now()
	b.daemon, err = buildkitd.Start(ctx, buildkitd.Config{
		Binary:             env.Buildkitd,
		Root:               env.Mount,
		Dir:                env.StateDir,
		Runc:               env.Runc,
		GC:                 setup.GC,
		InsecureRegistries: setup.InsecureRegistries,
		Entitlements:       setup.Entitlements,
		CgroupParent:       env.CgroupParent,
		MaxParallelism:     setup.MaxParallelism,
		// The volume outlives the build; step output may hold secrets.
		NoHistory: true,
		Proxy:     setup.Proxy,
		NoProxy:   setup.NoProxy,
		Logger:    log,
	})
	if err != nil {
		return err
	}
	log.Info("buildkitd ready", "took", time.Since(started).Round(time.Millisecond))
	return nil
}

// job runs one job on the running buildkitd: its context is unpacked onto
// the volume, its tunnels listened on, its solve run with its secrets and
// credentials (they live in the solve's session, in memory, and end with
// it); all of that is gone again when job returns.
func (b *builder) job(parent context.Context, task *guest.Task) (res solve.Result, err error) {
	// The job stops when the agent's caller stops it or the host cancels
	// it (or disappears).
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	stopFollow := context.AfterFunc(task.Context(), func() { cancel(context.Cause(task.Context())) })
	defer stopFollow()
	job, env := task.Job(), b.env
	if err := checkEmulation(env.BinfmtErrors, job.Solve.Platforms); err != nil {
		return res, err
	}

	var stopTunnels func()
	work := filepath.Join(env.Mount, workDirName)
	defer func() {
		if stopTunnels != nil {
			stopTunnels()
		}
		if e := os.RemoveAll(work); e != nil {
			e = fmt.Errorf("remove build context: %w", e)
			b.jobBroken = errors.Join(b.jobBroken, e)
			err = errors.Join(err, e)
		}
	}()
	if err := os.RemoveAll(work); err != nil {
		return res, fmt.Errorf("remove stale build context: %w", err)
	}
	if err := os.Mkdir(work, 0o700); err != nil {
		return res, fmt.Errorf("create build context dir: %w", err)
	}
	req, err := task.FetchContext(ctx, work)
	if err != nil {
		return res, err
	}
	if err := writeHosts(env.Hosts, job.Tunnels); err != nil {
		return res, err
	}
	if stopTunnels, err = task.ListenTunnels(ctx); err != nil {
		return res, err
	}

	task.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseSolving})
	res, err = solve.Run(ctx, b.daemon.Client(), req, task)
	if err != nil && ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != ctx.Err() {
			err = fmt.Errorf("%w: %w", err, cause)
		}
	}
	if err != nil && ctx.Err() == nil {
		select {
		case <-b.daemon.Exited():
			err = fmt.Errorf("%w\nbuildkitd exited during the build; its output:\n%s", err, b.daemon.StderrTail())
		default:
		}
	}
	return res, err
}

// broken says why the builder cannot take another job, nil if it can.
func (b *builder) broken() error {
	if b.daemon != nil {
		select {
		case <-b.daemon.Exited():
			return errors.Join(errors.New("buildkitd exited"), b.jobBroken)
		default:
		}
	}
	return b.jobBroken
}

// teardown stops buildkitd and releases the volume, whatever start got to:
// buildkitd, context, volume, in that order. Safe to call more than once.
func (b *builder) teardown(ctx context.Context) error {
	var errs []error
	if b.daemon != nil {
		sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		if e := b.daemon.Stop(sctx); e != nil {
			errs = append(errs, fmt.Errorf("stop buildkitd: %w", e))
		}
		scancel()
	}
	if b.mounted {
		if e := os.RemoveAll(filepath.Join(b.env.Mount, workDirName)); e != nil {
			errs = append(errs, fmt.Errorf("remove build context: %w", e))
		}
		if e := releaseVolume(b.env.Mount); e != nil {
			errs = append(errs, e)
		} else {
			b.mounted = false
		}
	}
	if e := errors.Join(errs...); e != nil {
		b.log.Error("cleanup failed", "err", e)
		return fmt.Errorf("clean up: %w", e)
	}
	return nil
}

// findDisk maps a disk serial to its device node, waiting for it to appear:
// virtio disks are probed asynchronously during boot.
func findDisk(ctx context.Context, serial string, env Env) (string, error) {
	if serial == "" {
		return "", errors.New("the job names no cache disk")
	}
	if dev, ok := env.Disks[serial]; ok {
		return dev, checkBlockDevice(dev)
	}
	deadline := time.Now().Add(env.DiskWait)
	for {
		var seen []string
		matches, _ := filepath.Glob("/sys/block/*/serial")
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err != nil {
				continue
			}
			name := filepath.Base(filepath.Dir(m))
			s := strings.TrimSpace(string(b))
			seen = append(seen, name+"="+s)
			if s == serial {
				dev := "/dev/" + name
				return dev, checkBlockDevice(dev)
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk with serial %q after %s (found %v); the host must attach the cache volume with serial=%s", serial, env.DiskWait, seen, serial)
		}
		select {
		case <-ctx.Done():
			return "", context.Cause(ctx)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func checkBlockDevice(dev string) error {
	fi, err := os.Stat(dev)
	if err != nil {
		return fmt.Errorf("cache disk: %w", err)
	}
	if fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
		return fmt.Errorf("cache disk %s is not a block device", dev)
	}
	return nil
}

// mountVolume mounts the ext4 cache volume. Never anything else: a tmpfs
// root would lose the cache with the VM. discarded: see
// buildkitd.MountRoot.
func mountVolume(dev, at string) (discarded bool, err error) {
	if m, err := buildkitd.MountsUnder(at); err != nil {
		return false, err
	} else if len(m) > 0 {
		return false, fmt.Errorf("%s is already in use (%v mounted); refusing to mount the cache volume over it", at, m)
	}
	return buildkitd.MountRoot(dev, at)
}

// releaseVolume flushes the volume and unmounts it together with whatever
// buildkitd left mounted below it, deepest first, so the filesystem is
// clean when the VM goes away.
func releaseVolume(at string) error {
	if fd, err := unix.Open(at, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
		_ = unix.Syncfs(fd)
		unix.Close(fd)
	}
	mounts, err := buildkitd.MountsUnder(at)
	if err != nil {
		return fmt.Errorf("release cache volume: %w", err)
	}
	for _, m := range mounts {
		if err := buildkitd.Unmount(m); err != nil {
			return fmt.Errorf("release cache volume: %w", err)
		}
	}
	return nil
}

// ensureCgroup2 mounts the unified cgroup hierarchy runc needs, unless the
// init already did.
func ensureCgroup2() error {
	const at = "/sys/fs/cgroup"
	var st unix.Statfs_t
	if err := unix.Statfs(at, &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		return nil
	}
	if err := os.MkdirAll(at, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", at, err)
	}
	if err := unix.Mount("cgroup2", at, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount cgroup2 on %s: %w; runc needs it", at, err)
	}
	return nil
}

// writeHosts writes the guest's hosts file: localhost, and each tunnel's
// host name at its listen IP.
func writeHosts(path string, tunnels []guest.Tunnel) error {
	var b strings.Builder
	b.WriteString("127.0.0.1\tlocalhost kiln-builder\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	named := false
	for _, t := range tunnels {
		if t.Host == "" {
			continue
		}
		ip, _, err := net.SplitHostPort(t.Listen)
		if err != nil {
			return fmt.Errorf("tunnel %q for %s: listen address %q: %w", t.Name, t.Host, t.Listen, err)
		}
		fmt.Fprintf(&b, "%s\t%s\n", ip, t.Host)
		named = true
	}
	if path == "" {
		if named {
			return errors.New("the job names a registry by host name, but this agent has no hosts file to write it to")
		}
		return nil
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write the guest's hosts file: %w", err)
	}
	return nil
}
