// Command kiln-init is /init in the builder VM's initramfs. It loads the
// kernel modules the Debian kernel needs for virtio and the filesystems,
// mounts the read-only erofs root disk, switches root onto it (runc cannot
// pivot_root out of an initramfs), registers the root's QEMU user-mode
// emulators with binfmt_misc (binfmt.go), then runs /usr/bin/kiln-agent
// and stays PID 1: it reaps orphans and powers the VM off when the agent
// exits, so a crashed agent ends the VM cleanly instead of panicking the
// kernel.
//
// The boot contract it implements is documented in internal/builderimage.
//
// With kiln.mode=run on the kernel command line it boots a converted image
// instead, for `kiln run`: the image's erofs disk under a writable tmpfs
// overlay becomes the root and /init runs one process in it, talking to
// the host over the kiln.run port (run.go; the protocol is documented in
// internal/runner).
//
// It must be built static (CGO_ENABLED=0).
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/runner/proto"
)

const (
	modulesOrder = "/kiln/modules.order"
	modulesDir   = "/kiln/modules"
	newRoot      = "/newroot"

	defaultRootSerial = "kiln-root"
	defaultAgent      = "/usr/bin/kiln-agent"
	rootWait          = 10 * time.Second
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-init: FATAL: %v\n", err)
	}
	powerOff()
}

func run() error {
	if err := mountEarly(); err != nil {
		return err
	}
	params := kernelParams()
	if err := loadModules(); err != nil {
		return err
	}
	switch mode := params[proto.ModeParam]; mode {
	case "":
	case proto.ModeRun:
		return runImage(params)
	default:
		return fmt.Errorf("unknown %s=%s on the kernel command line; want %s or nothing", proto.ModeParam, mode, proto.ModeRun)
	}
	serial := params["kiln.root"]
	if serial == "" {
		serial = defaultRootSerial
	}
	dev, err := waitForDisk(serial, rootWait)
	if err != nil {
		return err
	}
	if err := switchRoot(dev); err != nil {
		return err
	}
	if err := mountLate(); err != nil {
		return err
	}
	if err := unix.Sethostname([]byte("kiln-builder")); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	reportBinfmt(registerEmulators())
	agent := params["kiln.agent"]
	if agent == "" {
		agent = defaultAgent
	}
	return supervise(agent)
}

func mountEarly() error {
	return mountAll([]mountSpec{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", "mode=0755"},
	})
}

// mountSpec is one pseudo filesystem to mount.
type mountSpec struct{ src, dst, fstype, data string }

// mountAll mounts each of ms (nosuid, noexec), creating its mount point.
func mountAll(ms []mountSpec) error {
	for _, m := range ms {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", m.dst, err)
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	return nil
}

// kernelParams returns the key=value words of the kernel command line.
func kernelParams() map[string]string {
	b, _ := os.ReadFile("/proc/cmdline")
	params := map[string]string{}
	for _, w := range strings.Fields(string(b)) {
		if k, v, ok := strings.Cut(w, "="); ok {
			params[k] = v
		}
	}
	return params
}

func loadModules() error {
	f, err := os.Open(modulesOrder)
	if err != nil {
		return fmt.Errorf("read module list: %w (the initramfs is incomplete; rebuild the builder image)", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" {
			continue
		}
		if err := loadModule(filepath.Join(modulesDir, name)); err != nil {
			return err
		}
	}
	return sc.Err()
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open module %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w (does it match the kernel version?)", path, err)
	}
	return nil
}

// waitForDisk finds the virtio block device whose serial is serial. Disks
// are identified by serial, never by order, because the host may attach
// them in any order.
func waitForDisk(serial string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		matches, _ := filepath.Glob("/sys/block/vd*/serial")
		var seen []string
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err != nil {
				continue
			}
			s := strings.TrimSpace(string(b))
			name := filepath.Base(filepath.Dir(m))
			seen = append(seen, name+"="+s)
			if s == serial {
				return "/dev/" + name, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio disk with serial %q after %s (found %v); attach the builder root disk with serial=%s", serial, timeout, seen, serial)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func switchRoot(dev string) error {
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", newRoot, err)
	}
	if err := unix.Mount(dev, newRoot, "erofs", unix.MS_RDONLY|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("mount root disk %s (erofs) on %s: %w", dev, newRoot, err)
	}
	// The root is read-only; everything that must be written lives on
	// these tmpfs mounts or on disks the agent mounts.
	for _, m := range []struct {
		dst  string
		data string
	}{
		{"/run", "mode=0755"},
		{"/tmp", "mode=1777"},
	} {
		if err := unix.Mount("tmpfs", newRoot+m.dst, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, m.data); err != nil {
			return fmt.Errorf("mount tmpfs on %s: %w (the root image lacks the mount point?)", m.dst, err)
		}
	}
	return enterRoot(false)
}

// enterRoot moves /dev, /proc and /sys into the root mounted on newRoot
// (creating their mount points first if mkdirs: an image may lack them),
// frees the initramfs and makes newRoot the root.
func enterRoot(mkdirs bool) error {
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		if mkdirs {
			if err := os.MkdirAll(newRoot+d, 0o755); err != nil {
				return fmt.Errorf("create mount point %s in the new root: %w", d, err)
			}
		}
		if err := unix.Mount(d, newRoot+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s into the new root: %w", d, err)
		}
	}
	// Free the initramfs: it stays allocated in RAM otherwise.
	cleanInitramfs()
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move new root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into new root: %w", err)
	}
	return unix.Chdir("/")
}

// cleanInitramfs deletes the initramfs files, staying on the root device
// so the mounts moved under /newroot are never touched.
func cleanInitramfs() {
	var st unix.Stat_t
	if unix.Lstat("/", &st) != nil {
		return
	}
	rootDev := st.Dev
	var walk func(dir string)
	walk = func(dir string) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return
		}
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			var s unix.Stat_t
			if unix.Lstat(p, &s) != nil || s.Dev != rootDev {
				continue
			}
			if e.IsDir() {
				walk(p)
				_ = unix.Rmdir(p)
				continue
			}
			_ = unix.Unlink(p)
		}
	}
	walk("/")
}

func mountLate() error {
	for _, m := range []struct{ src, dst, fstype, data string }{
		{"devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620"},
		{"tmpfs", "/dev/shm", "tmpfs", "mode=1777"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", ""},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", m.dst, err)
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	return nil
}

// loopbackUp brings lo up: BuildKit's host network mode and anything
// listening on 127.0.0.1 in the guest need it.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring up lo: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring up lo: set flags: %w", err)
	}
	return nil
}

// supervise runs the agent and reaps every child until the agent exits.
// As PID 1 it inherits all orphans (runc, build steps), so it must wait
// for any pid, not just the agent's.
func supervise(agent string) error {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT)
	env := []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"TERM=linux",
	}
	pid, err := syscall.ForkExec(agent, []string{agent}, &syscall.ProcAttr{
		Dir:   "/",
		Env:   env,
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return fmt.Errorf("start agent %s: %w", agent, err)
	}
	for sig := range sigs {
		if sig != unix.SIGCHLD {
			// Only the host stops the VM; forward so the agent can
			// finish cleanly.
			_ = unix.Kill(pid, sig.(syscall.Signal))
			continue
		}
		for {
			var ws unix.WaitStatus
			wpid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || wpid <= 0 {
				break
			}
			if wpid == pid {
				fmt.Fprintf(os.Stderr, "kiln-init: agent exited (%s); powering off\n", describe(ws))
				return nil
			}
		}
	}
	return nil
}

func describe(ws unix.WaitStatus) string {
	var b bytes.Buffer
	switch {
	case ws.Exited():
		fmt.Fprintf(&b, "status %d", ws.ExitStatus())
	case ws.Signaled():
		fmt.Fprintf(&b, "signal %s", ws.Signal())
	default:
		fmt.Fprintf(&b, "wait status %#x", uint32(ws))
	}
	return b.String()
}

// powerOff ends the VM. With reboot=t on the kernel command line and
// QEMU's -no-reboot, a restart makes QEMU exit at once; a power-off can
// spin with ACPI on under -M microvm.
func powerOff() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	// Reboot only fails without CAP_SYS_BOOT, which PID 1 has; if it
	// returns anyway, exiting makes the kernel panic, and panic=-1 reboots.
	os.Exit(1)
}
