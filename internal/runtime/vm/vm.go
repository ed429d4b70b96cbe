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
		// A builder VM reaches only the registries the build names (and
		// the egress proxy for RUN steps); its BuildKit has no route to a
		// git host yet.
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
		Entitlements:       job.Entitlements,
		// Steps share the guest's own network; what it reaches is decided
		// by the tunnels (see network.go).
		Network:        "",
		MaxParallelism: cpus,
		Tunnels:        tunnels,
	}, mem, nil
}

// externalTunnel starts the name of the tunnel to a registry that is not
// kiln's; the rest of the name is the host:port the host side dials.
const externalTunnel = "external:"

// registryTunnels lists the registry hosts the build refers to (pushes,
// cache imports and export, docker-image:// named contexts, insecure
// registries); the agent listens on each inside the guest, at the address
// the reference names, so BuildKit talks to the reference as given. A
// builder VM has no other way to a registry.
//
// kiln's own registry (job.Registry; every host when it is empty, as for
// callers that predate it) gets a "registry" tunnel, which the host
// connects to where kiln's registry really listens. Every other host is
// an external registry: its tunnel is "external:<host:port>", which the
// host dials as named, resolving it on the host; TLS and credentials stay
// end to end between BuildKit and that registry. The guest must own the
// listen address, so a registry is named by a loopback IP:port or by a
// host name, which the guest maps to a loopback IP of its own.
func registryTunnels(job runtime.Job) ([]guest.Tunnel, error) {
	hosts := map[string]string{} // host → where it came from, for errors
	add := func(host, from string) {
		if _, ok := hosts[host]; !ok && host != "" {
			hosts[host] = from
		}
	}
	insecure := map[string]bool{}
	for _, h := range job.InsecureRegistries {
		add(h, "insecure registries")
		insecure[h] = true
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
	// Host names get a loopback IP each (127.0.1.0/24, clear of the IPs
	// references name and of the egress proxy's), one per name, so that a
	// name with registries on two ports resolves to both listeners.
	nameIPs := map[string]string{}
	for _, host := range slices.Sorted(maps.Keys(hosts)) {
		t, err := registryTunnel(host, hosts[host], job.Registry, insecure[host], nameIPs)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	slices.SortFunc(out, func(a, b guest.Tunnel) int { return strings.Compare(a.Listen, b.Listen) })
	for i := 1; i < len(out); i++ {
		if a, b := out[i-1], out[i]; a.Listen == b.Listen && a != b {
			return nil, fmt.Errorf("vm runtime: the build names two registries that would share the guest address %s (%s and %s); name them by different hosts or ports", a.Listen, tunnelTarget(a), tunnelTarget(b))
		}
	}
	// localhost:P and 127.0.0.1:P are one listener.
	return slices.Compact(out), nil
}

// registryTunnel is the tunnel of one registry host the build names.
func registryTunnel(host, from, kilnRegistry string, insecure bool, nameIPs map[string]string) (guest.Tunnel, error) {
	kiln := isKilnRegistry(host, kilnRegistry)
	name, port, err := net.SplitHostPort(host)
	if err != nil || port == "" || name == "" {
		if kiln {
			return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names registry %q (%s), which is not host:port; set registry_host to kiln's registry address, such as 127.0.0.1:7070 or kiln.example.com:7070", host, from)
		}
		bracketed := strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]")
		if strings.Contains(host, ":") && !bracketed {
			return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names registry %q (%s), which is not a registry host[:port]", host, from)
		}
		// No port: BuildKit speaks HTTPS on 443 to it, or, to one listed
		// as insecure, plain HTTP on 80 (after HTTPS on 443 was refused,
		// which the guest does at once: nothing listens there).
		name, port = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"), "443"
		if insecure {
			port = "80"
		}
		if name == "docker.io" {
			// BuildKit's name for Docker Hub's registry API.
			name = "registry-1.docker.io"
		}
	}
	t := guest.Tunnel{Name: "registry"}
	if name == "localhost" {
		// Already in the guest's hosts file; the guest listens on
		// 127.0.0.1, and so does an external registry named so on the
		// host.
		name = "127.0.0.1"
	}
	if addr, err := netip.ParseAddr(name); err == nil {
		if !addr.IsLoopback() {
			if kiln {
				return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names registry %q (%s), which a builder VM reaches as kiln's own registry, through a tunnel it listens on inside the guest at the address the reference names, and the guest cannot own the IP %s; set registry_host to a loopback IP:port (127.0.0.1:7070) or a host name (kiln.example.com:7070)", host, from, name)
			}
			return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names the external registry %q (%s) by the IP %s, which a builder VM cannot reach: it reaches every registry through a tunnel it listens on inside the guest at the address the reference names, and the guest cannot own a non-loopback IP; name that registry by a host name (registry.example.com:%s), which the guest maps to a loopback IP of its own", host, from, name, port)
		}
		t.Listen = net.JoinHostPort(name, port)
	} else {
		if strings.ContainsAny(name, "/# \t\r\n") {
			return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names registry %q (%s), which is not a registry host[:port]", host, from)
		}
		// DNS names are case-insensitive, and so is the guest's resolver.
		name = strings.ToLower(name)
		ip, ok := nameIPs[name]
		if !ok {
			if len(nameIPs) == 250 {
				return guest.Tunnel{}, fmt.Errorf("vm runtime: the build names more than 250 registry host names")
			}
			ip = fmt.Sprintf("127.0.1.%d", len(nameIPs)+1)
			nameIPs[name] = ip
		}
		t.Listen, t.Host = net.JoinHostPort(ip, port), name
	}
	if !kiln {
		t.Name = externalTunnel + net.JoinHostPort(name, port)
	}
	return t, nil
}

// isKilnRegistry reports whether the registry host a build names is kiln's
// own registry, kiln. When kiln is empty (a caller that predates
// runtime.Job.Registry) every host is. localhost:P and 127.0.0.1:P are one
// registry, as they are one listener in the guest.
func isKilnRegistry(host, kiln string) bool {
	if kiln == "" || strings.EqualFold(host, kiln) {
		return true
	}
	canon := func(h string) string {
		name, port, err := net.SplitHostPort(h)
		if err != nil {
			return strings.ToLower(h)
		}
		if strings.EqualFold(name, "localhost") {
			name = "127.0.0.1"
		}
		return strings.ToLower(net.JoinHostPort(name, port))
	}
	return canon(host) == canon(kiln)
}

// tunnelTarget names where a registry tunnel leads, for errors.
func tunnelTarget(t guest.Tunnel) string {
	if addr, ok := strings.CutPrefix(t.Name, externalTunnel); ok {
		return addr
	}
	return "kiln's registry"
}

// registryDialers are the host-side dialers of a builder's tunnels: kiln's
// registry where it really listens (addr), each external registry at the
// host:port its tunnel names, resolved and dialed from the host — at
// public internet addresses only unless an entry of allowed
// (registries.allowed) names it itself, so a name allowed by a wildcard
// cannot lead a builder into the server's own networks. A
// builder's set is fixed when it starts; builders are reused only for jobs
// of the same shape, which names the same registries.
func registryDialers(tunnels []guest.Tunnel, kiln string, allowed []string) map[string]guest.Dialer {
	m := map[string]guest.Dialer{"registry": guest.DialTCP(kiln)}
	for _, t := range tunnels {
		addr, ok := strings.CutPrefix(t.Name, externalTunnel)
		if !ok {
			continue
		}
		if egress.Listed(addr, allowed) {
			m[t.Name] = guest.DialTCP(addr)
			continue
		}
		m[t.Name] = func(ctx context.Context) (net.Conn, error) { return egress.DialPublic(ctx, addr) }
	}
	return m
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
