package config

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
)

// Host is what the machine offers builds.
type Host struct {
	CPUs      int
	MemoryMB  int
	DiskBytes int64 // size of the data dir's filesystem
	FreeBytes int64 // free space there now
}

// ReadHost measures the machine kiln runs on; dataDir need not exist yet
// (its nearest existing parent is measured).
func ReadHost(dataDir string) (Host, error) {
	h := Host{CPUs: runtime.NumCPU()}
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		return h, fmt.Errorf("read host memory: %w", err)
	}
	h.MemoryMB = int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return h, err
	}
	for {
		if _, err := os.Stat(dir); err == nil || dir == "/" {
			break
		}
		dir = filepath.Dir(dir)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return h, fmt.Errorf("read free disk at %s: %w", dir, err)
	}
	h.DiskBytes = int64(st.Blocks) * st.Bsize
	h.FreeBytes = int64(st.Bavail) * st.Bsize
	return h, nil
}

// CheckHost refuses caps this machine can never satisfy: more CPUs or
// memory than it has, or scratch volumes larger than the data dir's whole
// filesystem. It returns warnings for caps it can satisfy only partly
// (more disk than is free right now).
func (c *Config) CheckHost(h Host) (warnings []string, err error) {
	if c.CPUsMax > h.CPUs {
		return nil, fmt.Errorf("limits.cpus.max is %d but this host has %d CPUs: lower it", c.CPUsMax, h.CPUs)
	}
	if c.MemoryMBMax > h.MemoryMB {
		return nil, fmt.Errorf("limits.memory_mb.max is %d MiB but this host has %d MiB of memory: lower it", c.MemoryMBMax, h.MemoryMB)
	}
	if int64(c.DiskGBMax)<<30 > h.DiskBytes {
		return nil, fmt.Errorf("limits.disk_gb.max is %d GiB but the filesystem of the data dir %s holds only %d GiB: lower it or move the data dir", c.DiskGBMax, c.DataDir, h.DiskBytes>>30)
	}
	if c.CacheVolumeSize > h.DiskBytes {
		return nil, fmt.Errorf("cache.volume_size is %d GiB but the filesystem of the data dir %s holds only %d GiB: lower it", c.CacheVolumeSize>>30, c.DataDir, h.DiskBytes>>30)
	}
	if int64(c.DiskGBMax)<<30 > h.FreeBytes {
		warnings = append(warnings, fmt.Sprintf("limits.disk_gb.max is %d GiB but only %d GiB are free on the data dir's filesystem now; large builds may run out of space", c.DiskGBMax, h.FreeBytes>>30))
	}
	return warnings, nil
}
