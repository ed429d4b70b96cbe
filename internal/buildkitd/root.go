package buildkitd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kiln-build/kiln/internal/ext4"
)

// DiscardedUnclean is what MountRoot reports, for the build's progress,
// when it discarded a root.
const DiscardedUnclean = "the cache volume was not released cleanly last time (its builder was killed, froze, or its machine crashed), " +
	"so files its cache recorded may never have reached the disk; the cache was discarded and this build starts cold"

// MountRoot mounts the ext4 cache volume on dev (a block device) at at,
// for use as a buildkitd root. A volume that was still mounted when its
// machine died has a journal to replay; the mount replays it, and the
// filesystem is consistent again, but BuildKit's database may record
// snapshots whose file contents were only in that machine's page cache
// (a base image's binaries come back empty: "exec format error"). Such a
// root is emptied. discarded says whether that happened.
func MountRoot(dev, at string) (discarded bool, err error) {
	sb, err := ext4.ReadSuperblock(dev)
	if err != nil {
		return false, fmt.Errorf("cache volume %s: %w", dev, err)
	}
	if err := os.MkdirAll(at, 0o700); err != nil {
		return false, fmt.Errorf("create mount point %s: %w", at, err)
	}
	if err := syscall.Mount(dev, at, "ext4", syscall.MS_NOATIME, ""); err != nil {
		return false, fmt.Errorf("mount cache volume %s at %s: %w; is it an ext4 filesystem (and is the ext4 module loaded)?", dev, at, err)
	}
	if !sb.NeedsRecovery {
		return false, nil
	}
	if err := emptyRoot(at); err != nil {
		return true, errors.Join(fmt.Errorf("discard the cache of uncleanly released volume %s: %w", dev, err), Unmount(at))
	}
	return true, nil
}

// emptyRoot removes everything in the filesystem root at, except the
// lost+found directory mke2fs made.
func emptyRoot(at string) error {
	entries, err := os.ReadDir(at)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() == "lost+found" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(at, e.Name())); err != nil {
			return err
		}
	}
	return nil
}
