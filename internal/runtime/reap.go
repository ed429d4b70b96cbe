package runtime

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ReapBuildDirs calls reap for each per-build directory a crashed server
// left in stateDir (a runtime keeps one directory per running build there)
// and joins the errors, naming each directory. A missing stateDir has
// nothing to reap.
func ReapBuildDirs(ctx context.Context, stateDir string, reap func(dir, name string) error) error {
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
		if err := reap(dir, e.Name()); err != nil {
			errs = append(errs, fmt.Errorf("reap %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}
