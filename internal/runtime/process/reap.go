package process

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Reap undoes what builds of a crashed process left in stateDir: it kills
// their buildkitd and build steps, unmounts their volumes, frees the loop
// devices and removes their state dirs. Call it only when no build of this
// stateDir is running; New does so.
func Reap(ctx context.Context, stateDir string, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	entries, err := os.ReadDir(stateDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("reap %s: %w", stateDir, err)
	}
	var errs []error
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(stateDir, e.Name())
		log.Warn("process runtime: reaping leftovers of an interrupted build", "dir", dir)
		if err := reapBuild(stateDir, dir, e.Name()); err != nil {
			errs = append(errs, fmt.Errorf("reap %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

func reapBuild(stateDir, dir, buildID string) error {
	var errs []error
	if pid, ok := readPid(filepath.Join(dir, pidFileName)); ok && isOurBuildkitd(pid, dir) {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		if !waitGone(pid, 10*time.Second) {
			errs = append(errs, fmt.Errorf("buildkitd pid %d survived SIGKILL", pid))
		}
	}
	if err := killCgroup(cgroupName(stateDir, buildID)); err != nil {
		errs = append(errs, err)
	}
	mounts, err := mountsUnder(dir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, m := range mounts {
		if err := unmount(m); err != nil {
			errs = append(errs, err)
		}
	}
	var st buildState
	if data, err := os.ReadFile(filepath.Join(dir, stateFileName)); err == nil && json.Unmarshal(data, &st) == nil && st.Loop != "" {
		for _, dev := range loopDevicesFor(st.Volume) {
			if dev == st.Loop {
				if err := detachLoop(dev, st.Volume); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return removeStateDir(dir)
}

func readPid(path string) (int, bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid, err == nil && pid > 0
}

// isOurBuildkitd guards against a recycled pid: the process must be serving
// the socket in dir.
func isOurBuildkitd(pid int, dir string) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return strings.Contains(string(raw), "unix://"+filepath.Join(dir, socketName))
}

// waitGone waits until pid no longer exists or is a zombie (its parent, not
// us, will reap it).
func waitGone(pid int, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		if i := strings.LastIndexByte(string(data), ')'); i > 0 && i+2 < len(data) && data[i+2] == 'Z' {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}
