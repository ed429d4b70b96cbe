package vm

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
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/runtime"
)

// Reap kills the QEMU processes that builder VMs of a crashed server left
// in stateDir (running builds and warm builders alike) and removes their
// directories. Call it only when no builder of this stateDir is running;
// New does so.
func Reap(ctx context.Context, stateDir string, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	return runtime.ReapBuildDirs(ctx, stateDir, func(dir, _ string) error {
		var st builderState
		if data, err := os.ReadFile(filepath.Join(dir, stateFileName)); err == nil {
			_ = json.Unmarshal(data, &st)
		}
		pids := leftoverQEMU(dir)
		log.Warn("vm runtime: reaping leftovers of an interrupted builder", "dir", dir, "builder", st.Builder, "build", st.BuildID, "recorded_pid", st.PID, "qemu_pids", pids)
		return reapBuild(ctx, dir, pids)
	})
}

func reapBuild(ctx context.Context, dir string, pids []int) error {
	for _, pid := range pids {
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("kill leftover QEMU %d: %w", pid, err)
		}
	}
	// QEMU holds the cache volume's lock until it is dead; a zombie holds
	// nothing.
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				return fmt.Errorf("leftover QEMU %d still alive 10s after SIGKILL", pid)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	// The vm runtime mounts nothing on the host, but never delete through
	// a mount whoever made it.
	if m, err := buildkitd.MountsUnder(dir); err != nil {
		return err
	} else if len(m) > 0 {
		return fmt.Errorf("not removing %s: %v mounted below it", dir, m)
	}
	return os.RemoveAll(dir)
}

// leftoverQEMU finds the QEMU processes of one builder dir by their command
// line, which names the dir (the VM's socket paths are below it). That
// also covers a crash before state.json recorded the PID, and never
// mistakes a reused PID for the VM.
func leftoverQEMU(dir string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err != nil || pid == os.Getpid() {
			continue
		}
		raw, err := os.ReadFile(p)
		if err != nil || len(raw) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if !strings.Contains(filepath.Base(args[0]), "qemu") {
			continue
		}
		for _, a := range args[1:] {
			if strings.Contains(a, dir+string(filepath.Separator)) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesized command name.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}
