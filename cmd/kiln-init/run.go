package main

// Run mode (kiln.mode=run on the kernel command line): instead of the
// builder root and the agent, /init boots a converted image and runs one
// process in it for `kiln run`. The protocol and the host side are in
// internal/runner; this file is the guest side.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/runner/proto"
)

const (
	imageMount   = "/image"
	overlayStore = "/rw"
	portWait     = 10 * time.Second
	// drainWait bounds how long output is still collected after the
	// process and everything it started were killed; ackWait how long
	// the host may take to confirm it has the exit frame.
	drainWait = 2 * time.Second
	ackWait   = 5 * time.Second

	// Docker's default: containerd gives containers this many files.
	nofileLimit = 1 << 20
)

// Exit codes for a process that could not be started, as a shell (and
// docker run) reports them.
const (
	codeNotFound      = 127
	codeNotExecutable = 126
	codeSetupFailed   = 125
)

// startError is a failure to start the process, reported to the host with
// the exit code a shell would give.
type startError struct {
	code int
	err  error
}

func (e *startError) Error() string { return e.err.Error() }

func setupFailed(format string, args ...any) error {
	return &startError{code: codeSetupFailed, err: fmt.Errorf(format, args...)}
}

// runGuest is the guest end of one run.
type runGuest struct {
	port *os.File

	mu sync.Mutex // serializes frames written to port

	signals chan syscall.Signal
	acked   chan struct{}
	sigchld chan os.Signal
}

// runImage runs run mode. Errors before the hello reach only the console
// (the host shows its tail); after it, every failure is reported to the
// host as an exit frame and runImage returns nil.
func runImage(params map[string]string) error {
	dev, err := waitForPort(proto.Port, portWait)
	if err != nil {
		return err
	}
	// Open once for reading and writing and keep it open: the host's
	// writes while the port is closed are dropped.
	port, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open run channel %s: %w", dev, err)
	}
	g := &runGuest{
		port:    port,
		signals: make(chan syscall.Signal, 8),
		acked:   make(chan struct{}),
		sigchld: make(chan os.Signal, 16),
	}
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	if err := g.sendJSON(proto.KindHello, proto.Hello{Proto: proto.Name, Version: proto.Version, Kernel: unix.ByteSliceToString(uts.Release[:])}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	k, payload, err := proto.ReadFrame(port)
	if err != nil {
		return fmt.Errorf("read run spec: %w", err)
	}
	if k != proto.KindSpec {
		return fmt.Errorf("host sent a %s frame, want the run spec", k)
	}
	var spec proto.Spec
	if err := proto.DecodeJSON(k, payload, &spec); err != nil {
		return err
	}
	go g.readHost()

	serial := params[proto.ImageParam]
	if serial == "" {
		serial = proto.ImageSerial
	}
	exit := g.run(spec, serial)
	if exit.Error != "" {
		fmt.Fprintf(os.Stderr, "kiln-init: %s\n", exit.Error)
	}
	if err := g.sendJSON(proto.KindExit, exit); err != nil {
		return fmt.Errorf("send exit status: %w", err)
	}
	// The host closes its end of the port as soon as QEMU exits; wait
	// until it has the exit frame before rebooting so it cannot be lost.
	select {
	case <-g.acked:
	case <-time.After(ackWait):
		fmt.Fprintln(os.Stderr, "kiln-init: host did not acknowledge the exit status; rebooting anyway")
	}
	return nil
}

// run prepares the root, runs the process and returns its exit.
func (g *runGuest) run(spec proto.Spec, serial string) proto.Exit {
	cmd, err := prepareRun(spec, serial)
	if err != nil {
		return exitForStartError(err)
	}
	// Notify before the fork so no SIGCHLD can be missed.
	signal.Notify(g.sigchld, unix.SIGCHLD)
	pid, outputs, err := g.start(cmd)
	if err != nil {
		return exitForStartError(err)
	}
	ws := g.wait(pid)
	// The process is the run: like a container whose init exits, nothing
	// it left behind may keep running or keep writing.
	g.killAll()
	waitTimeout(outputs, drainWait)

	exit := proto.Exit{}
	switch {
	case ws.Exited():
		exit.Code = ws.ExitStatus()
	case ws.Signaled():
		exit.Code = 128 + int(ws.Signal())
		exit.Signal = unix.SignalName(ws.Signal())
	default:
		// Wait4 without WUNTRACED reports only exits and deaths.
		exit.Code = codeSetupFailed
		fmt.Fprintf(os.Stderr, "kiln-init: process ended with wait status %#x\n", uint32(ws))
	}
	return exit
}

func exitForStartError(err error) proto.Exit {
	code := codeSetupFailed
	var se *startError
	if errors.As(err, &se) {
		code = se.code
	}
	return proto.Exit{Code: code, Error: err.Error()}
}

// command is a fully resolved process to start.
type command struct {
	path string
	argv []string
	env  []string
	dir  string
	user proto.User
}

// prepareRun builds the root (the image under a writable overlay),
// enters it and resolves everything the process needs.
func prepareRun(spec proto.Spec, serial string) (command, error) {
	if len(spec.Argv) == 0 || spec.Argv[0] == "" {
		return command{}, setupFailed("no command to run: the image has no entrypoint or cmd; give one")
	}
	dev, err := waitForDisk(serial, rootWait)
	if err != nil {
		return command{}, setupFailed("%v", err)
	}
	if err := mountOverlayRoot(dev); err != nil {
		return command{}, setupFailed("%v", err)
	}
	hostname := spec.Hostname
	if hostname == "" {
		hostname = "kiln"
	}
	if err := unix.Sethostname([]byte(hostname)); err != nil {
		return command{}, setupFailed("set hostname: %v", err)
	}
	if err := loopbackUp(); err != nil {
		return command{}, setupFailed("%v", err)
	}
	writeEtcFiles(hostname)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: nofileLimit, Max: nofileLimit}); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-init: raise open file limit: %v\n", err)
	}

	user, err := resolveUser(spec.User)
	if err != nil {
		return command{}, setupFailed("%v", err)
	}
	env := spec.Env
	if !hasEnv(env, "HOME") {
		env = append(append([]string(nil), env...), "HOME="+user.Home)
	}
	dir := spec.WorkingDir
	if dir == "" {
		dir = "/"
	}
	if !filepath.IsAbs(dir) {
		dir = "/" + dir
	}
	// Docker creates a missing working directory, as root.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return command{}, setupFailed("create working directory %s: %v", dir, err)
	}
	path, err := lookPath(spec.Argv[0], envValue(env, "PATH"), dir)
	if err != nil {
		return command{}, err
	}
	return command{path: path, argv: spec.Argv, env: env, dir: dir, user: user}, nil
}

// mountOverlayRoot mounts the image disk read-only under a tmpfs-backed
// overlay and makes that overlay the root. The lower and upper mounts stay
// on the (emptied) initramfs underneath, where nothing in the new root
// can reach them.
func mountOverlayRoot(dev string) error {
	if err := os.MkdirAll(imageMount, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", imageMount, err)
	}
	// Images are converted to erofs; ext4 conversions work too. noload
	// keeps ext4 from replaying a journal on a read-only disk.
	if err := unix.Mount(dev, imageMount, "erofs", unix.MS_RDONLY|unix.MS_NODEV, ""); err != nil {
		if err2 := unix.Mount(dev, imageMount, "ext4", unix.MS_RDONLY|unix.MS_NODEV, "noload"); err2 != nil {
			return fmt.Errorf("mount image disk %s: not erofs (%v) nor ext4 (%v); convert the image with internal/rootfs", dev, err, err2)
		}
	}
	if err := os.MkdirAll(overlayStore, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", overlayStore, err)
	}
	// The writable layer is RAM: it counts against the VM's memory and
	// vanishes with the VM, so the image disk is never written.
	if err := unix.Mount("tmpfs", overlayStore, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs for the writable layer: %w", err)
	}
	for _, d := range []string{"upper", "work"} {
		if err := os.Mkdir(filepath.Join(overlayStore, d), 0o755); err != nil {
			return fmt.Errorf("create overlay %s dir: %w", d, err)
		}
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", newRoot, err)
	}
	// The merged root takes the image root's owner and mode, not the
	// upper directory's.
	var st unix.Stat_t
	if err := unix.Stat(imageMount, &st); err == nil {
		_ = unix.Chmod(overlayStore+"/upper", st.Mode&07777)
		_ = unix.Chown(overlayStore+"/upper", int(st.Uid), int(st.Gid))
	}
	opts := "lowerdir=" + imageMount + ",upperdir=" + overlayStore + "/upper,workdir=" + overlayStore + "/work"
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay root (%s): %w", opts, err)
	}
	if err := enterRoot(true); err != nil {
		return err
	}
	return mountAll([]mountSpec{
		{"devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620"},
		{"tmpfs", "/dev/shm", "tmpfs", "mode=1777"},
	})
}

// writeEtcFiles gives the image /etc/hostname and /etc/hosts for its
// hostname, as Docker does. Failing that (an /etc that is a file, say) is
// no reason not to run.
func writeEtcFiles(hostname string) {
	files := map[string]string{
		"/etc/hostname": hostname + "\n",
		"/etc/hosts":    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + hostname + "\n",
	}
	if err := os.MkdirAll("/etc", 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-init: create /etc: %v\n", err)
		return
	}
	for name, content := range files {
		// Replace rather than write through: the image may ship these as
		// symlinks to places that do not exist.
		_ = os.Remove(name)
		if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "kiln-init: write %s: %v\n", name, err)
		}
	}
}

func resolveUser(spec string) (proto.User, error) {
	var passwd, group io.Reader
	for _, f := range []struct {
		path string
		r    *io.Reader
	}{{"/etc/passwd", &passwd}, {"/etc/group", &group}} {
		file, err := os.Open(f.path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return proto.User{}, fmt.Errorf("open %s: %w", f.path, err)
		}
		defer file.Close()
		*f.r = file
	}
	return proto.ResolveUser(spec, passwd, group)
}

// lookPath finds argv[0] the way the process's own shell would: with the
// PATH of the process's environment, not init's.
func lookPath(file, path, dir string) (string, error) {
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := executable(p); err != nil {
			return "", startErrorFor(file, err)
		}
		return p, nil
	}
	var firstErr error
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, file)
		err := executable(p)
		if err == nil {
			return p, nil
		}
		if firstErr == nil && !errors.Is(err, os.ErrNotExist) {
			firstErr = err
		}
	}
	if firstErr != nil {
		return "", startErrorFor(file, firstErr)
	}
	return "", &startError{code: codeNotFound, err: fmt.Errorf("exec: %q: executable file not found in $PATH (%s)", file, path)}
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s is a directory: %w", p, unix.EACCES)
	}
	if fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable: %w", p, unix.EACCES)
	}
	return nil
}

func startErrorFor(what string, err error) error {
	code := codeSetupFailed
	switch {
	case errors.Is(err, unix.ENOENT):
		code = codeNotFound
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM), errors.Is(err, unix.ENOEXEC), errors.Is(err, unix.EISDIR):
		code = codeNotExecutable
	}
	return &startError{code: code, err: fmt.Errorf("exec %s: %w", what, err)}
}

func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == key {
			return true
		}
	}
	return false
}

func envValue(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val // the last one wins, as in getenv after putenv
		}
	}
	return v
}

// start forks the process with stdin empty and stdout/stderr on pipes
// whose contents go to the host as frames. It returns once the process
// exists; the returned group is done when both pipes reached EOF.
func (g *runGuest) start(c command) (int, *sync.WaitGroup, error) {
	devnull, err := os.Open("/dev/null")
	if err != nil {
		return 0, nil, setupFailed("open /dev/null: %v", err)
	}
	defer devnull.Close()
	var outputs sync.WaitGroup
	var writers []*os.File
	defer func() {
		for _, w := range writers {
			w.Close()
		}
	}()
	for _, k := range []proto.Kind{proto.KindStdout, proto.KindStderr} {
		r, w, err := os.Pipe()
		if err != nil {
			return 0, nil, setupFailed("create %s pipe: %v", k, err)
		}
		writers = append(writers, w)
		outputs.Add(1)
		go g.forward(k, r, &outputs)
	}
	fmt.Fprintf(os.Stderr, "kiln-init: running %s as %d:%d in %s\n", c.path, c.user.UID, c.user.GID, c.dir)
	groups := c.user.Groups
	if groups == nil {
		groups = []uint32{} // drop init's groups
	}
	pid, err := syscall.ForkExec(c.path, c.argv, &syscall.ProcAttr{
		Dir:   c.dir,
		Env:   c.env,
		Files: []uintptr{devnull.Fd(), writers[0].Fd(), writers[1].Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Credential: &syscall.Credential{Uid: c.user.UID, Gid: c.user.GID, Groups: groups},
		},
	})
	if err != nil {
		// The pipes' write ends close in the defer, so the forwarders end.
		return 0, nil, startErrorFor(fmt.Sprintf("%s as uid %d in %s", c.path, c.user.UID, c.dir), err)
	}
	return pid, &outputs, nil
}

// forward sends what the process writes on one pipe to the host.
func (g *runGuest) forward(k proto.Kind, r *os.File, wg *sync.WaitGroup) {
	defer wg.Done()
	defer r.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if werr := g.send(k, buf[:n]); werr != nil {
				// The host is gone; keep draining so the process is not
				// blocked on a full pipe while the VM goes down.
				fmt.Fprintf(os.Stderr, "kiln-init: send %s: %v\n", k, werr)
			}
		}
		if err != nil {
			return
		}
	}
}

// wait reaps children until the process exits, forwarding the host's
// signals to it meanwhile.
func (g *runGuest) wait(pid int) unix.WaitStatus {
	for {
		select {
		case <-g.sigchld:
			for {
				var ws unix.WaitStatus
				wpid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
				if err != nil || wpid <= 0 {
					break
				}
				if wpid == pid {
					return ws
				}
			}
		case sig := <-g.signals:
			_ = unix.Kill(pid, sig)
		}
	}
}

// killAll kills every process but init and reaps them.
func (g *runGuest) killAll() {
	_ = unix.Kill(-1, unix.SIGKILL)
	deadline := time.After(drainWait)
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
		if err == nil && wpid > 0 {
			continue
		}
		select {
		case <-g.sigchld:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			fmt.Fprintln(os.Stderr, "kiln-init: processes still running after SIGKILL; reporting the exit anyway")
			return
		}
	}
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
		fmt.Fprintln(os.Stderr, "kiln-init: output still open after the process was killed; some output may be lost")
	}
}

// readHost reads the host's frames after the spec: signals for the
// process and the final acknowledgement.
func (g *runGuest) readHost() {
	acked := false
	for {
		k, payload, err := proto.ReadFrame(g.port)
		if err != nil {
			if !acked {
				fmt.Fprintf(os.Stderr, "kiln-init: read run channel: %v\n", err)
			}
			return
		}
		switch k {
		case proto.KindSignal:
			var s proto.Signal
			if err := proto.DecodeJSON(k, payload, &s); err != nil || s.Signal <= 0 || s.Signal > 64 {
				fmt.Fprintf(os.Stderr, "kiln-init: ignoring bad signal frame %q\n", payload)
				continue
			}
			g.signals <- syscall.Signal(s.Signal)
		case proto.KindAck:
			if !acked {
				acked = true
				close(g.acked)
			}
		default:
			fmt.Fprintf(os.Stderr, "kiln-init: ignoring unexpected %s frame from the host\n", k)
		}
	}
}

func (g *runGuest) send(k proto.Kind, payload []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return proto.WriteFrame(g.port, k, payload)
}

func (g *runGuest) sendJSON(k proto.Kind, v any) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return proto.WriteJSON(g.port, k, v)
}

// waitForPort maps a virtio-serial port name to its /dev node. Ports and
// their names arrive from the host asynchronously after virtio_console
// loads, so it waits for them. There is no udev, so no
// /dev/virtio-ports/NAME.
func waitForPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, p := range names {
			b, err := os.ReadFile(p)
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(p))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q after %s (%d ports); the host must add virtserialport name=%s", name, timeout, len(names), name)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
