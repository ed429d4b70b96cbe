package buildkitd

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// mountInfo is one line of /proc/self/mountinfo, reduced to what cleanup
// needs.
type mountInfo struct {
	MountPoint string
	FSType     string
	Source     string
}

func readMounts() ([]mountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	var out []mountInfo
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+2 >= len(fields) {
			continue
		}
		out = append(out, mountInfo{
			MountPoint: unescapeMount(fields[4]),
			FSType:     fields[sep+1],
			Source:     unescapeMount(fields[sep+2]),
		})
	}
	return out, sc.Err()
}

// unescapeMount decodes the octal escapes (\040 for space) mountinfo uses.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// MountsUnder returns mount points at or below dir, deepest first so they
// can be unmounted in order. Callers use it to release a buildkitd root:
// the daemon's snapshot and step mounts live below it.
func MountsUnder(dir string) ([]string, error) {
	mounts, err := readMounts()
	if err != nil {
		return nil, err
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, m := range mounts {
		if m.MountPoint == dir || strings.HasPrefix(m.MountPoint, dir+"/") {
			out = append(out, m.MountPoint)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// Unmount unmounts target, retrying while it is busy and detaching it lazily
// as a last resort. A lazy detach is reported as an error because the
// filesystem may still be in use. Not being a mount point is success.
func Unmount(target string) error {
	var err error
	for range 25 {
		err = syscall.Unmount(target, 0)
		if err == nil || errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOENT) {
			return nil // EINVAL: not a mount point (any more)
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if lerr := syscall.Unmount(target, syscall.MNT_DETACH); lerr != nil {
		return fmt.Errorf("unmount %s: %w (lazy unmount also failed: %v)", target, err, lerr)
	}
	return fmt.Errorf("unmount %s: still busy after 5s, detached lazily; something still holds files on it", target)
}

// KillCgroup kills every process in the cgroup named name (relative to each
// hierarchy's root) and its children, then removes the cgroups. Daemon.Stop
// calls it for Config.CgroupParent; crash recovery calls it directly.
func KillCgroup(name string) error {
	if name == "" || strings.Contains(name, "..") || strings.HasPrefix(name, "/") {
		return fmt.Errorf("refusing to kill cgroup %q", name)
	}
	mounts, err := readMounts()
	if err != nil {
		return err
	}
	var dirs []string
	for _, m := range mounts {
		if m.FSType != "cgroup" && m.FSType != "cgroup2" {
			continue
		}
		root := filepath.Join(m.MountPoint, name)
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	if len(dirs) == 0 {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		alive := 0
		for _, d := range dirs {
			for _, pid := range cgroupPids(d) {
				alive++
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if alive == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still has %d processes after SIGKILL", name, alive)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	var errs []error
	for _, d := range dirs {
		// A freshly emptied cgroup can report EBUSY for a moment.
		var err error
		for range 20 {
			if err = syscall.Rmdir(d); err == nil || errors.Is(err, syscall.ENOENT) {
				err = nil
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

func cgroupPids(dir string) []int {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}
