package buildkitd

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// KillLeftover kills the buildkitd a crashed parent left serving dir (the
// Config.Dir it was started with) together with its process group, and
// waits until it is gone. A missing pid file, or a pid now used by another
// process, means there is nothing to kill.
func KillLeftover(dir string) error {
	pid, ok := readPid(filepath.Join(dir, pidFileName))
	if !ok || !isOurBuildkitd(pid, dir) {
		return nil
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if !waitGone(pid, 10*time.Second) {
		return fmt.Errorf("buildkitd pid %d survived SIGKILL", pid)
	}
	return nil
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
