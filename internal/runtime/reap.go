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

// MakeStateDir makes dir, a runtime's state dir, absolute and creates it
// (owner-only); who names the runtime in errors.
func MakeStateDir(who, dir string) (string, error) {
	if dir == "" {
		return "", fmt.Errorf("%s: state dir is empty", who)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("%s: state dir %s: %w", who, dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return "", fmt.Errorf("%s: create state dir: %w", who, err)
	}
	return abs, nil
}
