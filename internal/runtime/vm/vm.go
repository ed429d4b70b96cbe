package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/egress"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/runtime"
)

// Config configures the vm runtime.
type Config struct {
	// Image is the builder image every build boots (builderimage.Load).
	Image builderimage.Manifest
	// StateDir holds one directory per running builder VM. It must belong to
	// this Runtime alone: New reaps whatever a crashed predecessor left in
	// it. Keep it short (under ~60 bytes): QEMU's unix sockets live below.
	StateDir string
	// RegistryAddr is where kiln's registry really listens on the host
	// (host:port); the guest's registry tunnel connects there.
	RegistryAddr string

	// QEMU is the qemu-system-x86_64 binary; default found on PATH.
	QEMU string
	// Accel forces kvm or tcg; empty probes (microvm.ProbeAccel).
	Accel microvm.Accel
	// HelloTimeout bounds the boot, from starting QEMU to the agent's
	// hello (default 60s: a TCG boot takes ~4s, but many at once on a busy
	// host take longer).
	HelloTimeout time.Duration
	// CancelGrace is how long after a build's ctx ended the agent gets to
	// confirm it stopped the build (default 1s). A builder whose agent did
	// not confirm in time is killed; one that did stays reusable.
	CancelGrace time.Duration
	// Unresponsive is how long a running VM's agent may leave pings
	// unanswered before the VM counts as frozen (default 60s): it is
	// killed and the build runs again in a new VM, once.
	Unresponsive time.Duration
	// ExitWait bounds Builder.Stop's wait for the agent to stop buildkitd,
	// release the volume and power the VM off (default 10s); then the VM
	// is killed.
	ExitWait time.Duration
	// Console, if set, receives every VM's serial console (kernel, init
	// and agent log) as it arrives; for debugging.
	Console io.Writer
	Logger  *slog.Logger

	// Start boots one builder VM; default StartQEMU. Another hypervisor's
	// driver plugs in here.
	Start func(context.Context, microvm.Config) (Machine, error)
}

// Machine is one running builder VM, as much of it as Run needs.
type Machine interface {
	// Port is the host end of a named guest channel (virtio-serial with
	// QEMU; a vsock connection elsewhere), nil if there is none.
	Port(name string) io.ReadWriteCloser
	Done() <-chan struct{} // closed when the VM has ended
	Kill() error           // ends the VM now and waits until it is gone
	Wait() error           // the hypervisor's exit status
	PID() int              // the hypervisor process, for reaping after a crash
	Accel() microvm.Accel
	// ConsoleReport is what an error message should quote of the console.
	ConsoleReport(lines int) string
}

// StartQEMU boots a QEMU microvm (internal/microvm).
func StartQEMU(ctx context.Context, cfg microvm.Config) (Machine, error) {
	vm, err := microvm.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return qemuMachine{vm}, nil
}

type qemuMachine struct{ *microvm.VM }

func (m qemuMachine) Port(name string) io.ReadWriteCloser {
	if c := m.VM.Port(name); c != nil {
		return c
	}
	return nil
}

// Runtime boots builder VMs: one per build (Run), or one kept for many
// builds of the same shape (StartBuilder).
type Runtime struct {
	cfg   Config
	log   *slog.Logger
	accel microvm.Accel
	// egressHook lets tests point the egress proxy's resolver and dialer
	// at local servers.
	egressHook func(*egress.Config)

	// froze records volumes whose builder VM froze lately under TCG: their
	// next builder gets one vCPU (see Run).
	frozeMu sync.Mutex
	froze   map[string]time.Time
}

// frozeLately reports whether a builder of volume froze in the last hour.
func (r *Runtime) frozeLately(volume string) bool {
	r.frozeMu.Lock()
	defer r.frozeMu.Unlock()
	at, ok := r.froze[volume]
	return ok && time.Since(at) < time.Hour
}

func (r *Runtime) noteFreeze(volume string) {
	r.frozeMu.Lock()
	defer r.frozeMu.Unlock()
	if r.froze == nil {
		r.froze = map[string]time.Time{}
	}
	r.froze[volume] = time.Now()
}

var (
	_ runtime.Runtime = (*Runtime)(nil)
	_ runtime.Keeper  = (*Runtime)(nil)
)

// PhaseBooting is reported while the builder VM boots; the agent then
// reports the same phases as the process runtime ("starting buildkitd",
// "solving").
const PhaseBooting = "booting"

const (
	stateFileName = "state.json"
	// builderDirPref starts each builder's state dir name; a random part
	// follows, because a builder outlives any one build.
	builderDirPref = "b-"
	// minMemoryMB: below this the kernel, buildkitd and the tmpfs /run
	// do not fit (the boot matrix test covers 256 MiB and up).
	minMemoryMB = 256
	// defaultMemoryMB and defaultCPUs apply to jobs that name none.
	defaultMemoryMB = 2048
	defaultCPUs     = 1
)

// New checks the image and QEMU are usable, decides the accelerator and
// reaps leftovers of a crashed predecessor from cfg.StateDir.
func New(cfg Config) (*Runtime, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Image.Dir == "" {
		return nil, errors.New("vm runtime: no builder image; build one with `kiln builder-image build`")
	}
	for _, f := range []string{cfg.Image.KernelPath(), cfg.Image.InitramfsPath(), cfg.Image.RootfsPath()} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("vm runtime: builder image in %s is incomplete: %w; rebuild it with `kiln builder-image build`", cfg.Image.Dir, err)
		}
	}
	if cfg.RegistryAddr == "" {
		return nil, errors.New("vm runtime: registry address is empty; the guest's registry tunnel needs to know where kiln's registry listens")
	}
	if cfg.QEMU == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return nil, errors.New("vm runtime: qemu-system-x86_64 not found; install it with `apt-get install -y qemu-system-x86`")
		}
		cfg.QEMU = p
	}
	stateDir, err := runtime.MakeStateDir("vm runtime", cfg.StateDir)
	if err != nil {
		return nil, err
	}
	cfg.StateDir = stateDir
	if cfg.Start == nil {
		cfg.Start = StartQEMU
	}
	if cfg.HelloTimeout == 0 {
		cfg.HelloTimeout = 60 * time.Second
	}
	if cfg.CancelGrace == 0 {
		cfg.CancelGrace = time.Second
	}
	if cfg.ExitWait == 0 {
		cfg.ExitWait = 10 * time.Second
	}
	if err := Reap(context.Background(), cfg.StateDir, cfg.Logger); err != nil {
		// Only the leftover builds' own dirs are affected; new builds get
		// fresh ones, so keep serving and let the operator look.
		cfg.Logger.Warn("vm runtime: could not fully clean up after a previous run", "state_dir", cfg.StateDir, "err", err)
	}
	accel, reason := cfg.Accel, "set in the configuration"
	if accel == microvm.AccelAuto {
		accel, reason = microvm.ProbeAccel()
	}
	level := slog.LevelInfo
	if accel == microvm.AccelTCG {
		level = slog.LevelWarn
	}
	cfg.Logger.Log(context.Background(), level, "vm runtime: builder VMs use "+string(accel), "accelerator", accel, "reason", reason,
		"image", cfg.Image.Digest, "kernel", cfg.Image.KernelVersion, "image_dir", cfg.Image.Dir)
	return &Runtime{cfg: cfg, log: cfg.Logger, accel: accel}, nil
}

// Name is "vm".
func (r *Runtime) Name() string { return "vm" }

// Accel is the accelerator builder VMs run with.
func (r *Runtime) Accel() microvm.Accel { return r.accel }

// ImageDigest identifies the builder image builds run in; it belongs in a
// build's dedup key.
func (r *Runtime) ImageDigest() string { return r.cfg.Image.Digest }

var buildIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func cpuCount(n int) string {
	if n == 1 {
		return "1 CPU"
	}
	return fmt.Sprintf("%d CPUs", n)
}

// guestJob validates job and translates it into the agent's job.
func (r *Runtime) guestJob(job runtime.Job) (guest.Job, int, error) {
	if !buildIDPattern.MatchString(job.BuildID) {
		return guest.Job{}, 0, fmt.Errorf("vm runtime: build id %q must be 1-64 letters, digits, '_', '.', '-'", job.BuildID)
	}
	if job.Volume == "" {
		return guest.Job{}, 0, fmt.Errorf("vm runtime: build %s has no volume", job.BuildID)
	}
	if job.Solve.ContextURL != "" {
		// A builder VM reaches only kiln's registry (and the egress proxy
		// for RUN steps); its BuildKit has no route to a git host yet.
		return guest.Job{}, 0, fmt.Errorf("vm runtime: build %s has a git context, which the vm runtime does not fetch yet; send the context as a tar", job.BuildID)
	}
	if fi, err := os.Stat(job.Volume); err != nil || !fi.Mode().IsRegular() {
		return guest.Job{}, 0, fmt.Errorf("vm runtime: volume %s of build %s is not a regular file (an ext4 image)", job.Volume, job.BuildID)
	}
	mem := job.MemoryMB
	if mem == 0 {
		mem = defaultMemoryMB
	}
	if mem < minMemoryMB {
		return guest.Job{}, 0, fmt.Errorf("vm runtime: build %s asks for %d MiB; a builder VM needs at least %d MiB", job.BuildID, mem, minMemoryMB)
	}
	cpus := job.CPUs
	if cpus == 0 {
		cpus = defaultCPUs
	}
	tunnels, err := registryTunnels(job)
	if err != nil {
		return guest.Job{}, 0, err
	}
	return guest.Job{
		BuildID:            job.BuildID,
		Solve:              job.Solve,
		CacheDisk:          builderimage.CacheSerial,
		GC:                 buildkitd.GCPolicy(job.GC),
		InsecureRegistries: job.InsecureRegistries,
		// Steps share the guest's own network; what it reaches is decided
		// by the tunnels (see network.go).
		Network:        "",
		MaxParallelism: cpus,
		Tunnels:        tunnels,
	}, mem, nil
}

// registryTunnels lists the registry hosts the build refers to; the agent
// listens on each inside the guest and forwards to kiln's registry. A
// builder VM has no other network, so every registry a build names must be
// kiln's, addressed by a loopback IP the guest can own.
func registryTunnels(job runtime.Job) ([]guest.Tunnel, error) {
	hosts := map[string]string{} // host → where it came from, for errors
	add := func(host, from string) {
		if _, ok := hosts[host]; !ok && host != "" {
			hosts[host] = from
		}
	}
	for _, h := range job.InsecureRegistries {
		add(h, "insecure registries")
	}
	refs := append(append([]string(nil), job.Solve.Push...), job.Solve.CacheImports...)
	if job.Solve.CacheExport != "" {
		refs = append(refs, job.Solve.CacheExport)
	}
	for _, src := range job.Solve.NamedContexts {
		if ref, ok := strings.CutPrefix(src, "docker-image://"); ok {
			refs = append(refs, ref)
		}
	}
	for _, ref := range refs {
		named, err := reference.ParseNormalizedNamed(ref)
		if err != nil {
			return nil, fmt.Errorf("vm runtime: image reference %q: %w", ref, err)
		}
		add(reference.Domain(named), "reference "+ref)
	}
	var out []guest.Tunnel
	names := 0
	for _, host := range slices.Sorted(maps.Keys(hosts)) {
		from := hosts[host]
		name, port, err := net.SplitHostPort(host)
		if err != nil || port == "" || name == "" {
			return nil, fmt.Errorf("vm runtime: the build names registry %q (%s), which is not host:port; set registry_host to kiln's registry address, such as 127.0.0.1:7070 or kiln.example.com:7070", host, from)
		}
		if name == "localhost" {
			// Already in the guest's hosts file.
			out = append(out, guest.Tunnel{Name: "registry", Listen: net.JoinHostPort("127.0.0.1", port)})
			continue
		}
		if addr, err := netip.ParseAddr(name); err == nil {
			if !addr.IsLoopback() {
				return nil, fmt.Errorf("vm runtime: the build names registry %q (%s), but a builder VM reaches only kiln's own registry, through a tunnel it listens on inside the guest, which cannot own the IP %s; set registry_host to a loopback IP:port (127.0.0.1:7070) or a host name (kiln.example.com:7070)", host, from, name)
			}
			out = append(out, guest.Tunnel{Name: "registry", Listen: host})
			continue
		}
		// A host name: the guest resolves it to a loopback IP of its own
		// (127.0.1.0/24, clear of the IPs above and the egress proxy's).
		names++
		if names > 250 {
			return nil, fmt.Errorf("vm runtime: the build names more than 250 registry host names")
		}
		out = append(out, guest.Tunnel{Name: "registry", Listen: net.JoinHostPort(fmt.Sprintf("127.0.1.%d", names), port), Host: name})
	}
	slices.SortFunc(out, func(a, b guest.Tunnel) int { return strings.Compare(a.Listen, b.Listen) })
	// localhost:P and 127.0.0.1:P are one listener.
	return slices.CompactFunc(out, func(a, b guest.Tunnel) bool { return a.Listen == b.Listen }), nil
}

// helloWatch notes the first bytes from the agent (its hello): the boot is
// over.
type helloWatch struct {
	io.ReadWriteCloser
	onFirst func()
	got     atomic.Bool
}

func (h *helloWatch) Read(p []byte) (int, error) {
	n, err := h.ReadWriteCloser.Read(p)
	if n > 0 && h.got.CompareAndSwap(false, true) {
		h.onFirst()
	}
	return n, err
}

func (h *helloWatch) seen() bool { return h.got.Load() }

func accelName(a microvm.Accel) string {
	if a == microvm.AccelTCG {
		return "TCG software emulation, no KVM"
	}
	return string(a)
}
