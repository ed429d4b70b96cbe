package process

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/runtime"
)

// Reap undoes what builds of a crashed process left in stateDir: it kills
// their buildkitd and build steps, unmounts their volumes, frees the loop
// devices and removes their state dirs. Call it only when no build of this
// stateDir is running; New does so.
func Reap(ctx context.Context, stateDir string, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	return runtime.ReapBuildDirs(ctx, stateDir, func(dir, name string) error {
		log.Warn("process runtime: reaping leftovers of an interrupted build", "dir", dir)
		return reapBuild(stateDir, dir, name)
	})
}

func reapBuild(stateDir, dir, buildID string) error {
	var errs []error
	if err := buildkitd.KillLeftover(dir); err != nil {
		errs = append(errs, err)
	}
	if err := buildkitd.KillCgroup(cgroupName(stateDir, buildID)); err != nil {
		errs = append(errs, err)
	}
	mounts, err := buildkitd.MountsUnder(dir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, m := range mounts {
		if err := buildkitd.Unmount(m); err != nil {
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
