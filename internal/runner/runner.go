package runner

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/runner/proto"
)

// Spec is one run of an image.
type Spec struct {
	// Image is the builder image: its kernel and initramfs (kiln-init)
	// boot the run; its root filesystem is not used.
	Image builderimage.Manifest
	// RootFS is the image's converted root filesystem
	// (rootfs.Artifact.RootFS()): erofs, or ext4. It is attached
	// read-only and never written.
	RootFS string
	// Config is the image's run configuration (rootfs.Artifact.Config).
	Config rootfs.ImageConfig

	// Args, when not empty, replace the image's Cmd; the Entrypoint
	// stays, as with `docker run IMAGE ARGS...`.
	Args []string
	// Env entries (KEY=VALUE) are added to the image's, replacing
	// entries with the same key.
	Env []string
	// User and WorkingDir, when set, replace the image's.
	User       string
	WorkingDir string
	// Hostname defaults to a random 12-hex-digit name, like a container
	// ID.
	Hostname string

	// MemoryMiB defaults to DefaultMemoryMiB, CPUs to 1. Everything the
	// process writes to its filesystem is held in this memory.
	MemoryMiB int
	CPUs      int

	// StopTimeout is how long a canceled run's process has to exit after
	// its stop signal (the image's StopSignal, default SIGTERM) before
	// the VM is killed; default DefaultStopTimeout.
	StopTimeout time.Duration
	// BootTimeout bounds the time from starting QEMU to kiln-init's
	// hello; default DefaultBootTimeout.
	BootTimeout time.Duration

	// Console receives the VM's serial console (kernel and kiln-init
	// messages), not the process's output; optional. Its tail is part of
	// errors about the VM either way.
	Console io.Writer
	Logger  *slog.Logger
}

// Defaults for Spec.
const (
	DefaultMemoryMiB   = 512
	DefaultStopTimeout = time.Second
	DefaultBootTimeout = 2 * time.Minute
	// DefaultPath is PATH for images that set none, as in Docker.
	DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// StartError means the process could not be started in the VM: the
// command was not found or not executable, the user or group is not in
// the image, there was nothing to run. Code is the exit code Run also
// returns: 127 not found, 126 not executable, 125 anything else, as
// docker run reports them.
type StartError struct {
	Code int
	Msg  string
}

func (e *StartError) Error() string { return "start process in the VM: " + e.Msg }

// Run boots the image in a microVM, runs its entrypoint and cmd (or
// spec.Args) with its environment, working directory and user, streams
// the process's stdout and stderr to stdout and stderr (nil discards),
// and returns its exit code: 128+n if signal n killed it.
//
// A process that could not start returns its code with a *StartError.
// When ctx is done the process gets its stop signal and StopTimeout to
// exit, then the VM is killed; Run then returns the exit code if the
// process reported one (-1 otherwise) with an error wrapping ctx's. Any
// other failure of the VM returns -1 and an error with the tail of its
// console. In every case QEMU is gone and nothing is left on the host
// when Run returns; stdout and stderr are not written after that.
// Writes to them should not block for long: the VM waits for them.
func Run(ctx context.Context, spec Spec, stdout, stderr io.Writer) (int, error) {
	guestSpec, err := spec.prepare()
	if err != nil {
		return -1, err
	}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	log := spec.Logger
	if log == nil {
		log = slog.Default()
	}
	cfg := microvm.Config{
		Kernel: spec.Image.KernelPath(),
		Initrd: spec.Image.InitramfsPath(),
		Cmdline: append(append([]string(nil), spec.Image.Cmdline...),
			proto.ModeParam+"="+proto.ModeRun,
			proto.ImageParam+"="+proto.ImageSerial,
			// The console is for errors; printing every boot message
			// through the emulated UART costs time under TCG.
			"quiet"),
		MemoryMiB: spec.MemoryMiB,
		CPUs:      spec.CPUs,
		Disks:     []microvm.Disk{{Path: spec.RootFS, Serial: proto.ImageSerial, ReadOnly: true}},
		Ports:     []string{proto.Port},
		Console:   spec.Console,
		Logger:    log,
	}

	// microvm kills the VM the moment its context is done, but a canceled
	// run first gets StopTimeout to stop; so the VM lives on its own
	// context, tied to ctx only while it boots.
	vmCtx, vmCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer vmCancel()
	abortBoot := context.AfterFunc(ctx, vmCancel)
	vm, err := microvm.Start(vmCtx, cfg)
	if err != nil {
		abortBoot()
		if ctx.Err() != nil {
			return -1, fmt.Errorf("run canceled while the VM was starting: %w", ctx.Err())
		}
		return -1, fmt.Errorf("run image: %w", err)
	}
	defer vm.Kill()
	if !abortBoot() {
		vm.Kill()
		return -1, fmt.Errorf("run canceled while the VM was starting: %w", ctx.Err())
	}
	r := &run{spec: spec, guest: guestSpec, vm: vm, stdout: stdout, stderr: stderr, log: log}
	return r.supervise(ctx)
}

// prepare validates spec, fills in defaults and applies the image config
// the way Docker does.
func (s *Spec) prepare() (proto.Spec, error) {
	if s.Image.Dir == "" {
		return proto.Spec{}, errors.New("run image: no builder image given; load one with builderimage.Load or build it with builderimage.Build")
	}
	if s.RootFS == "" {
		return proto.Spec{}, errors.New("run image: no root filesystem given; convert the image first (rootfs.Store.Ensure) and pass Artifact.RootFS()")
	}
	if fi, err := os.Stat(s.RootFS); err != nil {
		return proto.Spec{}, fmt.Errorf("run image: root filesystem: %w", err)
	} else if !fi.Mode().IsRegular() {
		return proto.Spec{}, fmt.Errorf("run image: root filesystem %s is not a regular file", s.RootFS)
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = DefaultMemoryMiB
	}
	if s.CPUs == 0 {
		s.CPUs = 1
	}
	if s.StopTimeout <= 0 {
		s.StopTimeout = DefaultStopTimeout
	}
	if s.BootTimeout <= 0 {
		s.BootTimeout = DefaultBootTimeout
	}
	if _, err := stopSignal(s.Config.StopSignal); err != nil {
		return proto.Spec{}, err
	}
	if s.Hostname == "" {
		b := make([]byte, 6)
		rand.Read(b)
		s.Hostname = hex.EncodeToString(b)
	}
	if !validHostname.MatchString(s.Hostname) {
		return proto.Spec{}, fmt.Errorf("run image: hostname %q is invalid: use 1-63 letters, digits, '-' and '.'", s.Hostname)
	}
	argv := command(s.Config, s.Args)
	if len(argv) == 0 {
		return proto.Spec{}, &StartError{Code: 125, Msg: "the image has no entrypoint or cmd: give a command to run"}
	}
	env, err := environ(s.Config.Env, s.Env, s.Hostname)
	if err != nil {
		return proto.Spec{}, err
	}
	user := s.Config.User
	if s.User != "" {
		user = s.User
	}
	dir := s.Config.WorkingDir
	if s.WorkingDir != "" {
		dir = s.WorkingDir
	}
	if dir == "" {
		dir = "/"
	}
	if !strings.HasPrefix(dir, "/") {
		return proto.Spec{}, fmt.Errorf("run image: working directory %q is not absolute", dir)
	}
	return proto.Spec{Argv: argv, Env: env, WorkingDir: dir, User: user, Hostname: s.Hostname}, nil
}

var validHostname = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$`)

// command applies Docker's rule: the entrypoint stays, args replace cmd.
func command(cfg rootfs.ImageConfig, args []string) []string {
	cmd := cfg.Cmd
	if len(args) > 0 {
		cmd = args
	}
	return append(append([]string(nil), cfg.Entrypoint...), cmd...)
}

// environ merges the image's environment with extra (extra wins, order
// kept) and adds PATH and HOSTNAME where the image sets none, as Docker
// does. HOME is the guest's to add: it comes from the image's passwd.
func environ(image, extra []string, hostname string) ([]string, error) {
	var env []string
	index := map[string]int{}
	set := func(kv string) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := index[k]; ok {
			env[i] = kv
			return
		}
		index[k] = len(env)
		env = append(env, kv)
	}
	for _, kv := range image {
		set(kv)
	}
	for _, kv := range extra {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("run image: environment entry %q is not KEY=VALUE", kv)
		}
		set(kv)
	}
	var pre []string
	if _, ok := index["PATH"]; !ok {
		pre = append(pre, "PATH="+DefaultPath)
	}
	if _, ok := index["HOSTNAME"]; !ok {
		pre = append(pre, "HOSTNAME="+hostname)
	}
	return append(pre, env...), nil
}

// stopSignal parses an image's StopSignal ("SIGTERM", "TERM", "15").
func stopSignal(s string) (unix.Signal, error) {
	if s == "" {
		return unix.SIGTERM, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("run image: stop signal %q is out of range", s)
		}
		return unix.Signal(n), nil
	}
	name := strings.TrimPrefix(strings.ToUpper(s), "SIG")
	if sig := unix.SignalNum("SIG" + name); sig != 0 {
		return sig, nil
	}
	// Real-time signals as Docker names them (systemd images stop on
	// SIGRTMIN+3); glibc's SIGRTMIN is 34.
	for _, rt := range []struct {
		prefix, sep string
		base, sign  int
	}{{"RTMIN", "+", 34, 1}, {"RTMAX", "-", 64, -1}} {
		rest, ok := strings.CutPrefix(name, rt.prefix)
		if !ok {
			continue
		}
		n := 0
		if rest != "" {
			digits, ok := strings.CutPrefix(rest, rt.sep)
			var err error
			if n, err = strconv.Atoi(digits); !ok || err != nil || n < 0 {
				break
			}
		}
		if sig := rt.base + rt.sign*n; sig >= 34 && sig <= 64 {
			return unix.Signal(sig), nil
		}
	}
	return 0, fmt.Errorf("run image: the image's stop signal %q is not a signal name or number", s)
}

// run is one running VM, seen from the host.
type run struct {
	spec   Spec
	guest  proto.Spec
	vm     *microvm.VM
	stdout io.Writer
	stderr io.Writer
	log    *slog.Logger
}

// event is a control frame from the guest, or the end of the channel.
type event struct {
	kind    proto.Kind
	payload []byte
	err     error
}

func (r *run) supervise(ctx context.Context) (int, error) {
	port := r.vm.Port(proto.Port)
	if port == nil {
		return -1, errors.New("run image: the VM has no run port")
	}
	events := make(chan event, 4)
	quit := make(chan struct{})
	readerDone := make(chan struct{})
	go r.read(port, events, quit, readerDone)
	// Whatever happens, QEMU is gone and the reader has stopped writing
	// to stdout and stderr before Run returns.
	defer func() {
		close(quit)
		r.vm.Kill()
		<-readerDone
	}()

	boot := time.NewTimer(r.spec.BootTimeout)
	defer boot.Stop()
	var grace <-chan time.Time
	done := ctx.Done()
	started := false
	canceled := func() error { return fmt.Errorf("run canceled: %w", ctx.Err()) }
	for {
		select {
		case ev := <-events:
			if ev.err != nil {
				if done == nil {
					return -1, canceled()
				}
				if !started {
					return -1, fmt.Errorf("run image: the VM ended before kiln-init answered on port %s (%v); if the console shows the builder's boot, the builder image predates run mode: rebuild it%s", proto.Port, ev.err, r.consoleTail())
				}
				return -1, fmt.Errorf("run image: the VM ended before the process exited: %v%s", ev.err, r.consoleTail())
			}
			switch ev.kind {
			case proto.KindHello:
				var h proto.Hello
				if err := proto.DecodeJSON(ev.kind, ev.payload, &h); err != nil {
					return -1, fmt.Errorf("run image: %w", err)
				}
				if started {
					return -1, errors.New("run image: the guest said hello twice; the process may have taken over the VM's channel")
				}
				if h.Proto != proto.Name || h.Version != proto.Version {
					return -1, fmt.Errorf("run image: the guest says it speaks %s v%d, this kiln speaks %s v%d; rebuild the builder image", h.Proto, h.Version, proto.Name, proto.Version)
				}
				boot.Stop()
				if err := proto.WriteJSON(port, proto.KindSpec, r.guest); err != nil {
					return -1, fmt.Errorf("run image: send the run spec: %w%s", err, r.consoleTail())
				}
				started = true
				r.log.Debug("run: guest ready", "kernel", h.Kernel)
			case proto.KindExit:
				var x proto.Exit
				if err := proto.DecodeJSON(ev.kind, ev.payload, &x); err != nil {
					return -1, fmt.Errorf("run image: %w", err)
				}
				r.finish(port)
				switch {
				case x.Error != "":
					return x.Code, &StartError{Code: x.Code, Msg: x.Error}
				case done == nil:
					return x.Code, canceled()
				}
				return x.Code, nil
			}
		case <-done:
			done = nil
			if !started {
				return -1, canceled()
			}
			sig, _ := stopSignal(r.spec.Config.StopSignal)
			if err := proto.WriteJSON(port, proto.KindSignal, proto.Signal{Signal: int(sig)}); err != nil {
				return -1, canceled()
			}
			grace = time.After(r.spec.StopTimeout)
		case <-grace:
			return -1, canceled()
		case <-boot.C:
			return -1, fmt.Errorf("run image: kiln-init did not answer within %s of the VM starting; raise BootTimeout on a slow host%s", r.spec.BootTimeout, r.consoleTail())
		}
	}
}

// finish acknowledges the exit frame, which lets the guest reboot, and
// gives QEMU a moment to exit on its own.
func (r *run) finish(port io.Writer) {
	if err := proto.WriteFrame(port, proto.KindAck, nil); err != nil {
		return
	}
	select {
	case <-r.vm.Done():
		if err := r.vm.Wait(); err != nil {
			r.log.Warn("run: QEMU exited with an error after the process ended", "err", err)
		}
	case <-time.After(5 * time.Second):
		r.log.Warn("run: the VM did not power off after the process ended; killing it")
	}
}

// read delivers the guest's output to stdout and stderr and its control
// frames to events, until the port closes or quit.
func (r *run) read(port io.Reader, events chan<- event, quit <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	send := func(ev event) bool {
		select {
		case events <- ev:
			return true
		case <-quit:
			return false
		}
	}
	br := bufio.NewReaderSize(port, 64<<10)
	// A failing writer (a closed pipe) does not stop the process, as with
	// docker run; its output is dropped from then on.
	var outErr, errErr error
	for {
		k, payload, err := proto.ReadFrame(br)
		if err != nil {
			send(event{err: err})
			return
		}
		switch k {
		case proto.KindStdout:
			if outErr == nil {
				_, outErr = r.stdout.Write(payload)
			}
		case proto.KindStderr:
			if errErr == nil {
				_, errErr = r.stderr.Write(payload)
			}
		case proto.KindHello, proto.KindExit:
			if !send(event{kind: k, payload: payload}) {
				return
			}
		default:
			send(event{err: fmt.Errorf("unexpected %s frame from the guest", k)})
			return
		}
	}
}

// consoleTail is the end of the VM's console for error messages.
func (r *run) consoleTail() string {
	s := r.vm.ConsoleReport(30)
	if s == "" {
		return ""
	}
	return "\nVM console (last lines):\n" + s
}
