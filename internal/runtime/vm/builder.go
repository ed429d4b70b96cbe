package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// Run boots a builder VM with job.Volume attached, runs job on it and
// stops it: StartBuilder, Builder.Run, Builder.Stop. A VM that freezes
// is replaced once (see Config.Unresponsive). The VM is gone and its
// state dir removed when Run returns, also on failure and cancel.
func (r *Runtime) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (res solve.Result, err error) {
	if sink == nil {
		sink = progress.Discard
	}
	gs := &gatedSink{sink: sink}
	defer gs.close()
	log := r.log.With("build", job.BuildID)
	for attempt := 1; ; attempt++ {
		res, err = r.runOnce(ctx, job, gs)
		if !errors.Is(err, guest.ErrAgentUnresponsive) || ctx.Err() != nil || attempt == maxBoots {
			return res, err
		}
		// A frozen guest says nothing about the build: the build is
		// deterministic and its volume survives a killed VM (the next
		// mount discards what it cannot trust). So it gets a fresh VM,
		// once. Under TCG that VM has one vCPU: the TCG freezes on record
		// are of multi-vCPU guests, and one vCPU avoids multi-threaded
		// TCG altogether.
		how := "a new VM"
		if r.accel == microvm.AccelTCG && cpusOf(job) > 1 {
			job.CPUs = 1
			how = "a new VM with one vCPU"
		}
		log.Warn("vm runtime: builder VM froze; retrying the build in "+how, "attempt", attempt, "err", err)
		gs.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
			Message: fmt.Sprintf("builder VM stopped responding; running the build again in %s (attempt %d of %d)", how, attempt+1, maxBoots)})
	}
}

// maxBoots is how many VMs one Run may get when they freeze under it.
const maxBoots = 2

func cpusOf(job runtime.Job) int {
	if job.CPUs == 0 {
		return defaultCPUs
	}
	return job.CPUs
}

func (r *Runtime) runOnce(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, error) {
	b, err := r.startBuilder(ctx, job, sink)
	if err != nil {
		return solve.Result{}, err
	}
	res, err := b.Run(ctx, job, sink)
	// After a cancel or timeout the agent had its CancelGrace inside Run;
	// with ctx done, Stop kills the VM at once.
	if serr := b.Stop(ctx); serr != nil {
		err = errors.Join(err, serr)
	}
	return res, err
}

// StartBuilder boots a builder VM shaped for job (its volume, memory,
// CPUs, network, GC bounds and registries; see runtime.ShapeOf) and waits
// until its agent has mounted the volume and buildkitd is ready. The boot
// and buildkitd's start are reported to sink ("booting", "starting
// buildkitd"). It does not run job: call Run with it next.
//
// The VM outlives ctx, which only bounds the start; it runs until Stop.
func (r *Runtime) StartBuilder(ctx context.Context, job runtime.Job, sink progress.Sink) (runtime.Builder, error) {
	b, err := r.startBuilder(ctx, job, sink)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// builder is one builder VM, taking builds of one shape one at a time.
type builder struct {
	r     *Runtime
	id    string
	dir   string
	shape string
	// registry is kiln's registry as the builder's first job named it:
	// which hosts are kiln's decides the builder's tunnels.
	registry string
	// cpus are the VM's vCPUs and buildkitd's parallelism, as booted.
	cpus   int
	memMiB int
	log    *slog.Logger
	netw   *network
	denied *switchSink // egress denials, to the running build's sink
	vm     Machine
	killVM context.CancelFunc
	conn   *guest.Conn
	state  builderState

	mu      sync.Mutex
	running bool
	stopped bool
	// lost says why the builder may take no further build; nil while it
	// may.
	lost error

	stopOnce sync.Once
	stopErr  error
}

var _ runtime.Builder = (*builder)(nil)

// builderState is written next to a running VM so Reap can find its QEMU
// after a crash, and so an operator can tell what it is doing.
type builderState struct {
	Builder string `json:"builder"`
	// BuildID is the build running on it, empty while it is idle.
	BuildID string `json:"build_id,omitempty"`
	Volume  string `json:"volume"`
	PID     int    `json:"pid,omitempty"`
}

func (r *Runtime) startBuilder(ctx context.Context, job runtime.Job, sink progress.Sink) (_ *builder, err error) {
	if sink == nil {
		sink = progress.Discard
	}
	gs := &gatedSink{sink: sink}
	defer gs.close()
	gjob, mem, err := r.guestJob(job)
	if err != nil {
		return nil, err
	}
	if r.accel == microvm.AccelTCG && gjob.MaxParallelism > 1 && r.frozeLately(job.Volume) {
		// The pool replaces a builder lost under a build with a fresh one;
		// after a freeze under TCG that one gets a single vCPU, as Run's
		// retry does (the builder keeps the job's shape).
		gjob.MaxParallelism = 1
		gs.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
			Message: "a builder VM of this scope froze lately under TCG; this one gets one vCPU"})
	}
	id, err := newBuilderID()
	if err != nil {
		return nil, err
	}
	b := &builder{
		r:        r,
		id:       id,
		dir:      filepath.Join(r.cfg.StateDir, id),
		shape:    runtime.ShapeOf(job),
		registry: job.Registry,
		cpus:     gjob.MaxParallelism,
		memMiB:   mem,
		log:      r.log.With("builder", id),
		denied:   &switchSink{},
		state:    builderState{Builder: id, Volume: job.Volume},
		killVM:   func() {},
	}
	log := b.log.With("build", job.BuildID)
	if b.netw, err = r.buildNetwork(job, gjob.Tunnels, b.denied, log); err != nil {
		return nil, err
	}
	gjob = b.withNetwork(gjob)
	tunnels := registryDialers(gjob.Tunnels, r.cfg.RegistryAddr, job.AllowedRegistries)
	if b.netw.dialer != nil {
		tunnels[b.netw.tunnel.Name] = b.netw.dialer
	}
	if err := os.Mkdir(b.dir, 0o700); err != nil {
		b.netw.stop()
		return nil, fmt.Errorf("vm runtime: create builder state dir: %w", err)
	}
	defer func() {
		if err != nil {
			if terr := b.teardown(); terr != nil {
				log.Error("vm runtime: cleanup failed", "err", terr)
				err = errors.Join(err, terr)
			}
		}
	}()
	if err := writeState(b.dir, b.state); err != nil {
		return nil, err
	}

	// The VM lives on vmCtx, not ctx: it outlives the start. ctx may only
	// abort QEMU's own start; after that the setup's cancel and the kill
	// below take care of it.
	vmCtx, killVM := context.WithCancel(context.Background())
	b.killVM = killVM
	gs.Emit(progress.Event{Kind: progress.Phase, Time: time.Now(), Phase: PhaseBooting})
	started := time.Now()
	stopAbort := context.AfterFunc(ctx, killVM)
	b.vm, err = r.cfg.Start(vmCtx, microvm.Config{
		QEMU:      r.cfg.QEMU,
		Kernel:    r.cfg.Image.KernelPath(),
		Initrd:    r.cfg.Image.InitramfsPath(),
		Cmdline:   r.cfg.Image.Cmdline,
		MemoryMiB: mem,
		CPUs:      gjob.MaxParallelism,
		Disks: []microvm.Disk{
			{Path: r.cfg.Image.RootfsPath(), Serial: builderimage.RootSerial, ReadOnly: true},
			{Path: job.Volume, Serial: builderimage.CacheSerial},
		},
		Ports:   []string{builderimage.AgentPort},
		UserNet: gjob.NIC != nil,
		Accel:   r.accel,
		Console: r.cfg.Console,
		// QEMU's command line names its sockets below dir, which is how
		// Reap recognizes a leftover QEMU of this builder.
		RunDir: b.dir,
		Logger: log,
	})
	if !stopAbort() || err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("build canceled while starting the builder VM: %w", ctx.Err())
		}
		return nil, fmt.Errorf("vm runtime: start builder VM: %w", err)
	}
	b.state.PID = b.vm.PID()
	if err := writeState(b.dir, b.state); err != nil {
		return nil, err
	}

	agentPort := b.vm.Port(builderimage.AgentPort)
	if agentPort == nil {
		return nil, fmt.Errorf("vm runtime: the builder VM has no %s channel", builderimage.AgentPort)
	}
	port := &helloWatch{ReadWriteCloser: agentPort, onFirst: func() {
		took := time.Since(started).Round(time.Millisecond)
		log.Info("vm runtime: builder VM booted", "took", took, "accelerator", b.vm.Accel(), "memory_mib", mem, "cpus", gjob.MaxParallelism)
		gs.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
			Message: fmt.Sprintf("builder VM booted in %s (%s, %d MiB, %s)", took, accelName(b.vm.Accel()), mem, cpuCount(gjob.MaxParallelism))})
	}}
	host := &guest.Host{
		Tunnels:      tunnels,
		Unresponsive: r.cfg.Unresponsive,
		HelloTimeout: r.cfg.HelloTimeout,
		CancelGrace:  r.cfg.CancelGrace,
		Logger:       b.log, // Run adds the build
	}
	b.conn, err = host.Connect(ctx, port, gjob.Setup(), gs)
	if err == nil {
		log.Debug("vm runtime: builder ready", "took", time.Since(started).Round(time.Millisecond))
		return b, nil
	}
	switch {
	case ctx.Err() != nil:
		// The agent had its grace inside Connect.
	case port.seen() && !errors.Is(err, guest.ErrAgentGone):
		// The agent reported a failed setup: it has released the volume
		// and is exiting, which ends the VM.
		select {
		case <-b.vm.Done():
		case <-time.After(r.cfg.ExitWait):
			log.Warn("vm runtime: builder VM did not end after its agent reported a failed setup; killing it", "waited", r.cfg.ExitWait)
		}
	default:
		// Boot failure or a dead agent: the console tells why. A frozen
		// VM will not end by itself.
		b.awaitEnd(err, 2*time.Second)
		b.vm.Kill()
		err = fmt.Errorf("vm runtime: %w\nbuilder VM console (last lines):\n%s", err, b.vm.ConsoleReport(30))
	}
	return nil, err
}

// withNetwork adds the builder's network to a build's guest job: the
// egress proxy tunnel and proxy settings, or the user-mode NIC.
func (b *builder) withNetwork(gjob guest.Job) guest.Job {
	if b.netw.dialer != nil {
		// buildkitd reaches the registries it has tunnels for by name
		// directly, not through the proxy (which would take them to the
		// real host, if it let them through at all).
		gjob.NoProxy = noProxyHosts(gjob.Tunnels)
		gjob.Tunnels = append(gjob.Tunnels, b.netw.tunnel)
		gjob.Solve = withProxy(gjob.Solve, b.netw.tunnel.Listen)
		gjob.Proxy = "http://" + b.netw.tunnel.Listen
	}
	gjob.NIC = b.netw.nic
	return gjob
}

// Run runs one build on the builder's VM. job must have the shape the
// builder was started with. A VM that froze or died under the build makes
// the error wrap runtime.ErrBuilderLost (and guest.ErrAgentGone); the VM
// is then killed. On cancel the agent gets Config.CancelGrace to confirm it
// stopped the build; without a confirmation the VM is killed too.
func (b *builder) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (res solve.Result, err error) {
	if sink == nil {
		sink = progress.Discard
	}
	gs := &gatedSink{sink: sink}
	defer gs.close()
	if runtime.ShapeOf(job) != b.shape || job.Registry != b.registry {
		return res, fmt.Errorf("vm runtime: build %s does not fit builder %s: its volume, resources, network, GC bounds or registries differ from those the builder was started with; run it on a builder started for it", job.BuildID, b.id)
	}
	gjob, _, err := b.r.guestJob(job)
	if err != nil {
		return res, err
	}
	// The VM's vCPUs, as booted: one after a recent freeze under TCG
	// (StartBuilder), whatever the job asked for.
	gjob.MaxParallelism = b.cpus
	gjob = b.withNetwork(gjob)

	b.mu.Lock()
	switch {
	case b.stopped:
		b.mu.Unlock()
		return res, fmt.Errorf("vm runtime: builder %s is stopped; start a new one for build %s", b.id, job.BuildID)
	case b.running:
		b.mu.Unlock()
		return res, fmt.Errorf("vm runtime: builder %s is running another build; it takes one at a time", b.id)
	}
	if why := b.unusableLocked(); why != nil {
		b.mu.Unlock()
		return res, fmt.Errorf("vm runtime: builder %s cannot take build %s: %w", b.id, job.BuildID, why)
	}
	b.running = true
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.running = false
		b.mu.Unlock()
	}()

	log := b.log.With("build", job.BuildID)
	b.setBuild(job.BuildID)
	defer b.setBuild("")
	b.denied.set(gs)
	defer b.denied.set(nil)

	res, err = b.conn.Run(ctx, gjob, gs)
	switch {
	case err == nil:
	case errors.Is(err, guest.ErrAgentGone) && ctx.Err() == nil:
		// The VM died or froze under the build; the build may run again
		// on a fresh builder.
		b.lose(err)
		b.awaitEnd(err, 2*time.Second)
		b.vm.Kill()
		err = fmt.Errorf("vm runtime: %w: %w\nbuilder VM console (last lines):\n%s", runtime.ErrBuilderLost, err, b.vm.ConsoleReport(30))
	case ctx.Err() != nil:
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// A build that runs out of time may have been stuck in the
			// guest; what the VM last said is for the operator, and the
			// builder is not trusted with another build.
			b.lose(fmt.Errorf("build %s timed out on it", job.BuildID))
			log.Warn("vm runtime: build timed out; the builder VM's console", "console", b.vm.ConsoleReport(20))
		}
		if cerr := b.conn.Err(); cerr != nil {
			// No confirmation: the solve may still be running. Only
			// killing the VM stops it for sure.
			b.lose(cerr)
			b.vm.Kill()
		}
	}
	if cerr := b.conn.Err(); cerr != nil {
		b.lose(cerr)
	}
	return res, err
}

// awaitEnd gives a VM whose agent went away (not froze) a moment to end by
// itself, so its console holds its last words.
func (b *builder) awaitEnd(err error, limit time.Duration) {
	if errors.Is(err, guest.ErrAgentUnresponsive) {
		return
	}
	select {
	case <-b.vm.Done():
	case <-time.After(limit):
	}
}

// Reusable reports whether the builder may take another build: its VM
// and agent are there and answering (checked continuously, also while it
// is idle), its last build ended with a result or a build failure, or
// with a cancel the agent confirmed in time.
func (b *builder) Reusable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.stopped && !b.running && b.unusableLocked() == nil
}

// unusableLocked is why the builder may not take a build, nil if it may.
// A VM or agent that is gone wraps runtime.ErrBuilderLost.
func (b *builder) unusableLocked() error {
	if b.lost != nil {
		return b.lost
	}
	select {
	case <-b.vm.Done():
		b.lost = fmt.Errorf("%w: its VM ended", runtime.ErrBuilderLost)
		return b.lost
	default:
	}
	if err := b.conn.Err(); err != nil {
		b.lost = err
		if errors.Is(err, guest.ErrAgentGone) {
			b.lost = fmt.Errorf("%w: %w", runtime.ErrBuilderLost, err)
		}
		return b.lost
	}
	return nil
}

func (b *builder) lose(why error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lost == nil {
		if errors.Is(why, guest.ErrAgentGone) && !errors.Is(why, runtime.ErrBuilderLost) {
			why = fmt.Errorf("%w: %w", runtime.ErrBuilderLost, why)
		}
		if errors.Is(why, guest.ErrAgentUnresponsive) {
			b.r.noteFreeze(b.state.Volume)
		}
		b.lost = why
	}
}

// MemoryMB is the VM's memory.
func (b *builder) MemoryMB() int { return b.memMiB }

// Stop tells the agent to stop buildkitd, release the volume and power
// the VM off, and waits for that until Config.ExitWait has passed or ctx
// ended, whichever comes first; then it kills the VM. A builder that is
// lost, or a ctx that is already done, skips the release: the VM is killed
// at once, and its volume is recovered by the next mount's journal replay.
// When Stop returns QEMU is gone and the state dir removed. It is safe to
// call more than once; only the first call acts.
func (b *builder) Stop(ctx context.Context) error {
	b.stopOnce.Do(func() { b.stopErr = b.stop(ctx) })
	return b.stopErr
}

func (b *builder) stop(ctx context.Context) error {
	b.mu.Lock()
	b.stopped = true
	release := !b.running && b.unusableLocked() == nil && ctx.Err() == nil
	b.mu.Unlock()
	var errs []error
	if release {
		rctx, cancel := context.WithTimeout(ctx, b.r.cfg.ExitWait)
		err := b.conn.Release(rctx)
		switch {
		case err == nil:
			select {
			case <-b.vm.Done():
			case <-rctx.Done():
				b.log.Warn("vm runtime: builder VM did not power off after releasing its volume; killing it", "waited", b.r.cfg.ExitWait)
			}
		case errors.Is(err, guest.ErrAgentGone) || rctx.Err() != nil:
			b.log.Warn("vm runtime: builder VM did not release its volume; killing it (the next mount replays the journal)", "err", err)
		default:
			// The agent said it could not release the volume cleanly.
			errs = append(errs, fmt.Errorf("vm runtime: stop builder %s: %w", b.id, err))
		}
		cancel()
	}
	if err := b.teardown(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// teardown kills whatever is left of the builder and removes its state
// dir; it returns once QEMU is gone.
func (b *builder) teardown() error {
	if b.conn != nil {
		b.conn.Close()
	}
	if b.vm != nil {
		b.vm.Kill() // no-op when it ended already; waits until reaped
		if qerr := b.vm.Wait(); qerr != nil {
			b.log.Debug("vm runtime: QEMU exit", "err", qerr)
		}
	}
	b.killVM()
	b.netw.stop()
	if err := os.RemoveAll(b.dir); err != nil {
		b.log.Error("vm runtime: cleanup failed", "err", err)
		return fmt.Errorf("vm runtime: remove builder state dir: %w", err)
	}
	return nil
}

// setBuild records the running build in the state file.
func (b *builder) setBuild(buildID string) {
	b.mu.Lock()
	b.state.BuildID = buildID
	st := b.state
	b.mu.Unlock()
	if err := writeState(b.dir, st); err != nil {
		b.log.Warn("vm runtime: could not record the running build", "err", err)
	}
}

// newBuilderID names a builder's state dir: short and fixed-length,
// because QEMU's unix socket paths live below it.
func newBuilderID() (string, error) {
	var p [6]byte
	if _, err := rand.Read(p[:]); err != nil {
		return "", fmt.Errorf("vm runtime: name a builder: %w", err)
	}
	return builderDirPref + hex.EncodeToString(p[:]), nil
}

func writeState(dir string, st builderState) error {
	data, _ := json.Marshal(st)
	tmp := filepath.Join(dir, stateFileName+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("vm runtime: record builder state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, stateFileName)); err != nil {
		return fmt.Errorf("vm runtime: record builder state: %w", err)
	}
	return nil
}
