package microvm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/tail"
)

// Config describes one VM.
type Config struct {
	// QEMU is the qemu-system-x86_64 binary; default found on PATH.
	QEMU string
	// Kernel is an uncompressed vmlinux with a PVH entry point; Initrd is
	// optional.
	Kernel string
	Initrd string
	// Cmdline is appended to the base kernel command line (BaseCmdline).
	Cmdline []string

	MemoryMiB int
	CPUs      int

	// Disks become virtio-blk devices in this order; the guest should
	// find them by serial, not by order.
	Disks []Disk
	// Ports are virtio-serial port names (e.g. "kiln.0"). Each is wired to
	// a host connection returned by VM.Port.
	Ports []string
	// UserNet adds one virtio-net NIC on QEMU's user-mode network (slirp):
	// the guest is UserNetGuest on UserNetCIDR, its gateway UserNetGateway
	// and its resolver UserNetDNS. QEMU opens the guest's connections as
	// its own sockets, so the guest needs no privileges on the host and
	// the host needs no bridge or tap. Note that slirp maps the gateway
	// address to the host's loopback: the guest must not route to it if
	// it is not meant to reach the host's local services.
	UserNet bool

	// Accel forces KVM or TCG; AccelAuto probes (see ProbeAccel).
	Accel Accel

	// Console receives the guest's serial console (kernel messages,
	// init's output) as it arrives; optional. The last 64 KiB are always
	// kept for VM.Console.
	Console io.Writer
	// RunDir holds the VM's sockets while it starts; default os.TempDir.
	RunDir string
	// StartTimeout bounds how long QEMU may take to connect its ports;
	// default 30s.
	StartTimeout time.Duration

	Logger *slog.Logger
}

// Disk is a raw disk image attached as virtio-blk.
type Disk struct {
	Path   string
	Serial string // at most 20 bytes: virtio-blk's serial field
	// ReadOnly attaches the disk read-only; QEMU then takes only a shared
	// lock, so several VMs can boot from one image at once.
	ReadOnly bool
}

// BaseCmdline is always on the kernel command line. console=ttyS0 is
// what Console captures. reboot=t makes a guest reboot a triple fault,
// which -no-reboot turns into QEMU exiting at once; an ACPI power-off can
// spin under -M microvm. panic=-1 turns a kernel panic (for instance init
// dying) into such a reboot, so a broken guest never hangs.
var BaseCmdline = []string{"console=ttyS0", "reboot=t", "panic=-1"}

// VM is a running QEMU process.
type VM struct {
	cmd     *exec.Cmd
	accel   Accel
	args    []string
	ports   map[string]*net.UnixConn
	console *tail.Buffer
	stderr  *tail.Buffer
	log     *slog.Logger

	mu     sync.Mutex
	exited bool // QEMU has exited but may not be reaped yet
	done   chan struct{}
	err    error
}

// Start launches QEMU and returns once every device is set up, every port
// is connected and the guest runs; the port sockets exist only while
// Start runs. The VM lives until the guest powers off or reboots, Kill or
// Stop is called, or ctx is done, whichever comes first; in all cases
// QEMU is gone once Wait returns.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	accel := cfg.Accel
	if accel == AccelAuto {
		var reason string
		accel, reason = ProbeAccel()
		logAccelOnce(log, accel, reason)
	}
	qemu := cfg.QEMU
	if qemu == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return nil, errors.New("qemu-system-x86_64 not found; install it with `apt-get install -y qemu-system-x86`")
		}
		qemu = p
	}
	runDir := cfg.RunDir
	if runDir == "" {
		runDir = os.TempDir()
	}
	sockDir, err := os.MkdirTemp(runDir, "kiln-vm-")
	if err != nil {
		return nil, fmt.Errorf("create VM socket directory: %w", err)
	}
	// The sockets are only needed until QEMU has connected.
	defer os.RemoveAll(sockDir)

	// Socket 0 is QMP, then one per port. QEMU connects to all of them
	// as a client while it creates its chardevs.
	names := append([]string{"qmp"}, cfg.Ports...)
	listeners := make([]*net.UnixListener, len(names))
	sockets := make([]string, len(names))
	defer func() {
		for _, l := range listeners {
			if l != nil {
				l.Close()
			}
		}
	}()
	for i := range names {
		sockets[i] = filepath.Join(sockDir, fmt.Sprintf("s%d.sock", i))
		if len(sockets[i]) > 107 {
			return nil, fmt.Errorf("VM socket path %s is longer than the 107 bytes unix sockets allow; use a shorter RunDir", sockets[i])
		}
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sockets[i], Net: "unix"})
		if err != nil {
			return nil, fmt.Errorf("listen for VM socket %s: %w", names[i], err)
		}
		listeners[i] = l
	}

	args := Args(cfg, accel, sockets[0], sockets[1:])
	cmd := exec.Command(qemu, args...)
	vm := &VM{
		cmd:     cmd,
		accel:   accel,
		args:    args,
		ports:   map[string]*net.UnixConn{},
		console: tail.New(64 << 10),
		stderr:  tail.New(16 << 10),
		log:     log,
		done:    make(chan struct{}),
	}
	var consoleOut io.Writer = vm.console
	if cfg.Console != nil {
		consoleOut = io.MultiWriter(vm.console, cfg.Console)
	}
	cmd.Stdin = nil
	cmd.Stdout = consoleOut
	cmd.Stderr = vm.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group so Kill reaches everything QEMU is; Pdeathsig
		// so a crashed kiln does not leave VMs running.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", qemu, err)
	}
	go vm.wait()

	stop := context.AfterFunc(ctx, func() { vm.Kill() })
	if err := vm.boot(ctx, cfg, names, listeners); err != nil {
		stop()
		vm.Kill()
		return nil, err
	}
	// Keep killing on ctx for the VM's whole life.
	go func() {
		<-vm.done
		stop()
	}()
	return vm, nil
}

// TCGCPU is the guest CPU under TCG: a named model, not "max". "max" is
// every feature this QEMU's TCG emulates, including its newest (AVX/AVX2
// arrived in 7.2), and 2-vCPU guests on it are publicly reported to hang
// on some hosts while the same guest runs on others; kiln's CI saw a
// builder VM freeze there and never here. Westmere is a fixed, fully
// emulated x86-64-v2 set (SSE4.2, POPCNT, AES-NI, PCLMUL; QEMU warns about
// none of it) that Debian's kernel, runc and Go binaries run on; RDRAND
// seeds the guest's entropy at once. Builds took no longer on it than on
// "max" here.
const TCGCPU = "Westmere-v1,+rdrand"

// Args is the QEMU command line for cfg: QMP on the unix socket qmp and
// port i on portSockets[i]. QEMU connects to all of them as a client and
// starts with the guest paused (-S) until QMP says "cont".
func Args(cfg Config, accel Accel, qmp string, portSockets []string) []string {
	args := []string{
		// Nothing implicit: no default devices, no config files, no
		// display, seccomp on, and a guest reset ends the process.
		"-nodefaults", "-no-user-config", "-display", "none",
		"-sandbox", "on", "-no-reboot", "-S",
		"-chardev", "socket,id=qmp,path=" + qemuEscape(qmp),
		"-mon", "chardev=qmp,mode=control",
		// ACPI stays on: without it the Debian kernel (no
		// VIRTIO_MMIO_CMDLINE_DEVICES) finds no virtio-mmio device.
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
	}
	cmdline := append([]string(nil), BaseCmdline...)
	switch accel {
	case AccelKVM:
		args = append(args, "-accel", "kvm", "-cpu", "host")
	default:
		args = append(args, "-accel", "tcg,thread=multi", "-cpu", TCGCPU)
		// See hostTSCKHz: without the frequency a busy host makes the
		// guest's timer calibration fail and the boot hang. Under TCG
		// all vCPUs read the host's TSC, so it is also a reliable
		// clocksource, far better than jiffies.
		if khz := hostTSCKHz(); khz > 0 {
			cmdline = append(cmdline, fmt.Sprintf("tsc_early_khz=%d", khz), "tsc=reliable")
		}
	}
	cmdline = append(cmdline, cfg.Cmdline...)
	args = append(args,
		"-m", strconv.Itoa(cfg.MemoryMiB)+"M",
		"-smp", strconv.Itoa(cfg.CPUs),
		"-kernel", cfg.Kernel,
		"-append", strings.Join(cmdline, " "),
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
	)
	if cfg.Initrd != "" {
		args = append(args, "-initrd", cfg.Initrd)
	}
	// QEMU's default writeback cache: guest flushes still reach the disk,
	// and VMs booting from one root image share the host's page cache.
	// Writable disks pass discards through, so space the guest frees in a
	// sparse cache volume is returned to the host.
	for i, d := range cfg.Disks {
		mode := "readonly=off,discard=unmap"
		if d.ReadOnly {
			mode = "readonly=on"
		}
		id := fmt.Sprintf("disk%d", i)
		args = append(args,
			"-drive", fmt.Sprintf("id=%s,file=%s,if=none,format=raw,%s", id, qemuEscape(d.Path), mode),
			"-device", fmt.Sprintf("virtio-blk-device,drive=%s,serial=%s", id, d.Serial))
	}
	if len(cfg.Ports) > 0 {
		args = append(args, "-device", "virtio-serial-device,id=vser0")
		for i, name := range cfg.Ports {
			id := fmt.Sprintf("port%d", i)
			args = append(args,
				"-chardev", fmt.Sprintf("socket,id=%s,path=%s", id, qemuEscape(portSockets[i])),
				"-device", fmt.Sprintf("virtserialport,bus=vser0.0,nr=%d,chardev=%s,name=%s", i+1, id, name))
		}
	}
	if cfg.UserNet {
		args = append(args,
			"-netdev", "user,id=net0,ipv6=off,net="+UserNetCIDR+",host="+UserNetGateway+",dns="+UserNetDNS,
			"-device", "virtio-net-device,netdev=net0,mac="+UserNetMAC)
	}
	return args
}

// The user-mode network's fixed layout (QEMU's defaults, written down so
// the guest side can configure itself without DHCP).
const (
	UserNetCIDR    = "10.0.2.0/24"
	UserNetGuest   = "10.0.2.15/24"
	UserNetGateway = "10.0.2.2"
	UserNetDNS     = "10.0.2.3"
	UserNetMAC     = "52:54:00:12:34:56"
)

// qemuEscape doubles commas, QEMU's option separator.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func (c *Config) validate() error {
	if c.Kernel == "" {
		return errors.New("microvm: no kernel given")
	}
	for _, f := range []string{c.Kernel, c.Initrd} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("microvm: %w", err)
		}
	}
	if c.MemoryMiB < 64 {
		return fmt.Errorf("microvm: memory %d MiB is too small; give at least 64 MiB", c.MemoryMiB)
	}
	if c.CPUs < 1 {
		c.CPUs = 1
	}
	if c.CPUs > 255 {
		return fmt.Errorf("microvm: %d CPUs is more than the 255 QEMU's microvm machine supports", c.CPUs)
	}
	if c.Accel != AccelAuto && c.Accel != AccelKVM && c.Accel != AccelTCG {
		return fmt.Errorf("microvm: unknown accelerator %q; use kvm, tcg or empty for auto", c.Accel)
	}
	serials := map[string]bool{}
	for _, d := range c.Disks {
		if _, err := os.Stat(d.Path); err != nil {
			return fmt.Errorf("microvm: disk %s: %w", d.Serial, err)
		}
		if d.Serial == "" || len(d.Serial) > 20 || strings.ContainsAny(d.Serial, ", =") {
			return fmt.Errorf("microvm: disk serial %q must be 1-20 characters without commas, spaces or '='", d.Serial)
		}
		if serials[d.Serial] {
			return fmt.Errorf("microvm: two disks have serial %q", d.Serial)
		}
		serials[d.Serial] = true
	}
	names := map[string]bool{}
	for _, p := range c.Ports {
		if p == "" || strings.ContainsAny(p, ", =") || names[p] {
			return fmt.Errorf("microvm: port name %q is empty, repeated or contains commas, spaces or '='", p)
		}
		names[p] = true
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 30 * time.Second
	}
	return nil
}

// boot accepts QEMU's connections to the QMP and port sockets, then
// resumes the guest through QMP. QMP answers only once QEMU has created
// every device, so a device error (a locked disk, a bad option) fails
// Start instead of surfacing later, and the ports are connected before
// the guest can write to them.
func (v *VM) boot(ctx context.Context, cfg Config, names []string, ls []*net.UnixListener) error {
	deadline := time.Now().Add(cfg.StartTimeout)
	var qmp *net.UnixConn
	for i, l := range ls {
		c, err := v.accept(ctx, l, deadline)
		if err != nil {
			return fmt.Errorf("start VM: QEMU did not connect %s: %w", names[i], err)
		}
		if i == 0 {
			qmp = c
			defer qmp.Close()
			continue
		}
		v.mu.Lock()
		v.ports[names[i]] = c
		v.mu.Unlock()
	}
	qmp.SetDeadline(deadline)
	if err := qmpResume(qmp); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("start VM: %w", ctx.Err())
		}
		// QEMU closes QMP when it fails during setup; wait for its exit
		// so the error carries all of its stderr.
		select {
		case <-v.done:
			return fmt.Errorf("start VM: QEMU exited during setup: %v", v.err)
		case <-time.After(2 * time.Second):
			return fmt.Errorf("start VM: resume guest over QMP: %w%s", err, v.stderrSuffix())
		}
	}
	return nil
}

func (v *VM) accept(ctx context.Context, l *net.UnixListener, deadline time.Time) (*net.UnixConn, error) {
	l.SetDeadline(deadline)
	type res struct {
		c   *net.UnixConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := l.AcceptUnix()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("%w%s", r.err, v.stderrSuffix())
		}
		return r.c, nil
	case <-v.done:
		l.Close()
		return nil, fmt.Errorf("QEMU exited: %v", v.err)
	case <-ctx.Done():
		l.Close()
		return nil, ctx.Err()
	}
}

// qmpResume negotiates QMP and continues the paused guest.
func qmpResume(c *net.UnixConn) error {
	r := bufio.NewReader(c)
	greeting, err := r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("read QMP greeting: %w", err)
	}
	if !bytes.Contains(greeting, []byte(`"QMP"`)) {
		return fmt.Errorf("unexpected QMP greeting %q", greeting)
	}
	for _, cmd := range []string{"qmp_capabilities", "cont"} {
		if _, err := fmt.Fprintf(c, "{\"execute\":%q}\n", cmd); err != nil {
			return fmt.Errorf("QMP %s: %w", cmd, err)
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return fmt.Errorf("QMP %s: %w", cmd, err)
			}
			var resp struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Desc string `json:"desc"`
				} `json:"error"`
			}
			if err := json.Unmarshal(line, &resp); err != nil {
				return fmt.Errorf("QMP %s: bad reply %q: %w", cmd, line, err)
			}
			if resp.Error != nil {
				return fmt.Errorf("QMP %s: %s", cmd, resp.Error.Desc)
			}
			if resp.Return != nil {
				break
			}
			// Anything else is an asynchronous event.
		}
	}
	return nil
}

func (v *VM) stderrSuffix() string {
	if s := strings.TrimSpace(v.stderr.String()); s != "" {
		return ": " + s
	}
	return ""
}

// wait notes QEMU's exit before reaping it, so Kill never signals a
// process group whose leader's PID may already be reused.
func (v *VM) wait() {
	pid := v.cmd.Process.Pid
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	v.mu.Lock()
	v.exited = true
	// Anything QEMU left behind in its group goes with it.
	unix.Kill(-pid, unix.SIGKILL)
	v.mu.Unlock()
	err := v.cmd.Wait()
	v.mu.Lock()
	for _, c := range v.ports {
		c.Close()
	}
	v.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("qemu: %w%s", err, v.stderrSuffix())
	}
	v.err = err
	close(v.done)
}

// Kill stops the VM at once (SIGKILL to QEMU's process group) and waits
// until QEMU is reaped. It is safe to call any number of times.
func (v *VM) Kill() error {
	v.mu.Lock()
	if !v.exited {
		unix.Kill(-v.cmd.Process.Pid, unix.SIGKILL)
	}
	v.mu.Unlock()
	<-v.done
	return nil
}

// Stop asks QEMU to quit (SIGTERM), and kills it if it has not exited
// after grace.
func (v *VM) Stop(grace time.Duration) error {
	v.mu.Lock()
	if !v.exited {
		unix.Kill(v.cmd.Process.Pid, unix.SIGTERM)
	}
	v.mu.Unlock()
	select {
	case <-v.done:
		return nil
	case <-time.After(grace):
		return v.Kill()
	}
}

// Wait blocks until QEMU has exited and returns its error, nil when the
// guest powered off or rebooted.
func (v *VM) Wait() error {
	<-v.done
	return v.err
}

// Done is closed when QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// Port returns the host end of a virtio-serial port, or nil if the VM has
// no such port. Closing it tells the guest the host went away.
func (v *VM) Port(name string) *net.UnixConn {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.ports[name]
}

// Console returns the last 64 KiB of the guest's serial console.
func (v *VM) Console() string { return v.console.String() }

// PID is QEMU's process ID.
func (v *VM) PID() int { return v.cmd.Process.Pid }

// Accel is the accelerator the VM runs with.
func (v *VM) Accel() Accel { return v.accel }

// Args is the QEMU command line the VM was started with.
func (v *VM) Args() []string { return append([]string(nil), v.args...) }

var accelLogOnce sync.Once

func logAccelOnce(log *slog.Logger, accel Accel, reason string) {
	accelLogOnce.Do(func() {
		if accel == AccelTCG {
			log.Warn("microvm: KVM not usable, running VMs under TCG software emulation (builds roughly 10-20x slower)", "reason", reason)
			return
		}
		log.Info("microvm: using KVM", "reason", reason)
	})
}

// kernelTrouble matches the first line of the kernel's own account of why
// a guest went wrong; it usually scrolls out of a plain tail behind a call
// trace, and it is the line that says what happened.
var kernelTrouble = regexp.MustCompile(`Kernel panic|BUG:|Oops|WARNING:|watchdog:|rcu: .*stall|Out of memory|invoked oom-killer|hung_task|blocked for more than|segfault at|Attempted to kill init`)

// ConsoleReport is the part of the console an error message should carry:
// the first kernel complaint (with a few lines after it) when there is one
// outside the last n lines, then the last n lines.
func (v *VM) ConsoleReport(n int) string { return consoleReport(v.Console(), n) }

func consoleReport(console string, n int) string {
	lines := strings.Split(strings.TrimRight(console, "\n"), "\n")
	start := max(len(lines)-n, 0)
	var out []string
	for i, l := range lines[:start] {
		if kernelTrouble.MatchString(l) {
			out = append(out, lines[i:min(i+8, start)]...)
			if i+8 < start {
				out = append(out, "[…]")
			}
			break
		}
	}
	out = append(out, lines[start:]...)
	return strings.TrimSpace(strings.Join(out, "\n"))
}
