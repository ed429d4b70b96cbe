package process

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/buildkitd"
)

// attachment is a volume image attached to a loop device and mounted.
type attachment struct {
	file       string
	device     string // /dev/loopN
	mountPoint string
	// discarded: the volume was not released cleanly and its cache was
	// emptied (buildkitd.MountRoot).
	discarded bool
}

// attachVolume attaches the ext4 image file to a free loop device and mounts
// it at mountPoint. It refuses a file that is already attached: mounting one
// ext4 filesystem twice corrupts it.
func attachVolume(ctx context.Context, file, mountPoint string) (*attachment, error) {
	abs, err := canonicalPath(file)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", file, err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", file, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("volume %s is not a regular file (want an ext4 image)", file)
	}
	if devs := loopDevicesFor(abs); len(devs) > 0 {
		return nil, fmt.Errorf("volume %s is already attached to %s; another build is using it or a crashed one left it behind", file, strings.Join(devs, ", "))
	}
	out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", abs).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("attach volume %s to a loop device: %w: %s", file, err, strings.TrimSpace(string(out)))
	}
	a := &attachment{file: abs, device: strings.TrimSpace(string(out)), mountPoint: mountPoint}
	if a.discarded, err = buildkitd.MountRoot(a.device, mountPoint); err != nil {
		return nil, errors.Join(fmt.Errorf("volume %s: %w", file, err), detachLoop(a.device, abs))
	}
	return a, nil
}

// release flushes the filesystem, unmounts it and frees the loop device, and
// verifies the kernel really let go of the file, so the next attach of the
// same volume cannot see a half-released filesystem.
func (a *attachment) release() error {
	if fd, err := syscall.Open(a.mountPoint, syscall.O_RDONLY|syscall.O_DIRECTORY, 0); err == nil {
		_ = unix.Syncfs(fd)
		syscall.Close(fd)
	}
	// Snapshot and step mounts buildkitd left below the volume go first,
	// deepest first; mountsUnder includes the mount point itself, last.
	mounts, err := buildkitd.MountsUnder(a.mountPoint)
	if err != nil {
		return fmt.Errorf("release volume %s: %w", a.file, err)
	}
	if len(mounts) == 0 {
		mounts = []string{a.mountPoint}
	}
	for _, m := range mounts {
		if err := buildkitd.Unmount(m); err != nil {
			// Leave the loop device alone: the filesystem is still in use.
			return fmt.Errorf("release volume %s: %w", a.file, err)
		}
	}
	return detachLoop(a.device, a.file)
}

// detachLoop frees device and waits until no loop device refers to file.
func detachLoop(device, file string) error {
	if out, err := exec.Command("losetup", "--detach", device).CombinedOutput(); err != nil {
		msg := strings.TrimSpace(string(out))
		if !strings.Contains(msg, "No such device") {
			return fmt.Errorf("detach loop device %s: %w: %s", device, err, msg)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		devs := loopDevicesFor(file)
		if len(devs) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("volume %s is still attached to %s after detaching; a process still uses the filesystem", file, strings.Join(devs, ", "))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// loopDevicesFor lists loop devices whose backing file is file.
func loopDevicesFor(file string) []string {
	entries, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var devs []string
	for _, e := range entries {
		data, err := os.ReadFile(e)
		if err != nil {
			continue
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(data)), " (deleted)")
		if backing == file {
			devs = append(devs, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(e))))
		}
	}
	return devs
}

func canonicalPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}
