package buildkitd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// cgroupRoot is where the cgroup filesystems are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// errNoMemoryController: this host's cgroups cannot limit memory.
var errNoMemoryController = errors.New("this host has no memory cgroup controller (cgroup v2 without it enabled at the root, or v1 without /sys/fs/cgroup/memory)")

// limitMemory caps what every process below the cgroup parent may use
// together (swap included where the kernel accounts it), before runc
// creates the steps' cgroups under it. It handles the unified (v2)
// hierarchy and v1's memory controller.
func limitMemory(parent string, bytes int64) error {
	if parent == "" {
		return errors.New("a memory limit needs a cgroup parent")
	}
	limit := strconv.FormatInt(bytes, 10)
	var dir string
	var files []string // written in order; the first one must exist
	if controllers, err := os.ReadFile(filepath.Join(cgroupRoot, "cgroup.controllers")); err == nil {
		if !slices.Contains(strings.Fields(string(controllers)), "memory") {
			return errNoMemoryController
		}
		dir = filepath.Join(cgroupRoot, parent)
		files = []string{"memory.max", "memory.swap.max"}
	} else {
		v1 := filepath.Join(cgroupRoot, "memory")
		var fs unix.Statfs_t
		if unix.Statfs(v1, &fs) != nil || fs.Type != unix.CGROUP_SUPER_MAGIC {
			return errNoMemoryController
		}
		dir = filepath.Join(v1, parent)
		// memsw (memory+swap) may only be set at or above the memory limit.
		files = []string{"memory.limit_in_bytes", "memory.memsw.limit_in_bytes"}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s for the build's memory limit: %w", dir, err)
	}
	for i, f := range files {
		value := limit
		if f == "memory.swap.max" {
			value = "0" // v2 counts swap apart from memory.max
		}
		err := os.WriteFile(filepath.Join(dir, f), []byte(value), 0)
		switch {
		case err == nil:
		case i > 0 && errors.Is(err, os.ErrNotExist):
			// No swap accounting on this kernel: memory alone is capped.
		default:
			return fmt.Errorf("limit the build's memory to %d bytes (%s): %w", bytes, filepath.Join(dir, f), err)
		}
	}
	return nil
}
