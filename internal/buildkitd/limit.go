package buildkitd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// cgroupRoot is where the cgroup filesystems are mounted.
const cgroupRoot = "/sys/fs/cgroup"

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
	if _, err := os.Stat(filepath.Join(cgroupRoot, "cgroup.controllers")); err == nil {
		dir = filepath.Join(cgroupRoot, parent)
		files = []string{"memory.max", "memory.swap.max"}
	} else {
		dir = filepath.Join(cgroupRoot, "memory", parent)
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
