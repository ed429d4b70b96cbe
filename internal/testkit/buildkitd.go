package testkit

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	buildkitdOnce sync.Once
	buildkitdPath string
	buildkitdErr  error
)

// Buildkitd returns the path of a buildkitd binary: $KILN_BUILDKITD if set,
// else <repo>/bin/buildkitd, building it from the go.mod tool dependency the
// first time (that takes minutes; later runs reuse the binary).
func Buildkitd(t testing.TB) string {
	t.Helper()
	p, err := BuildkitdPath()
	if err != nil {
		t.Fatalf("buildkitd binary: %v", err)
	}
	return p
}

// BuildkitdPath is Buildkitd for code without a testing.TB (TestMain).
func BuildkitdPath() (string, error) {
	buildkitdOnce.Do(func() { buildkitdPath, buildkitdErr = findOrBuildBuildkitd() })
	return buildkitdPath, buildkitdErr
}

func findOrBuildBuildkitd() (string, error) {
	return goTool("KILN_BUILDKITD", "buildkitd", "github.com/moby/buildkit/cmd/buildkitd", nil)
}

func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// waitForForeignBuild waits while any process is running `go build -o X`
// with X naming bin.
func waitForForeignBuild(bin string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for foreignBuildRunning(bin) {
		if time.Now().After(deadline) {
			return fmt.Errorf("gave up after %s waiting for another `go build -o %s` to finish", limit, bin)
		}
		time.Sleep(2 * time.Second)
	}
	return nil
}

func foreignBuildRunning(bin string) bool {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if len(args) < 4 || filepath.Base(args[0]) != "go" || args[1] != "build" {
			continue
		}
		for i, a := range args[:len(args)-1] {
			if a != "-o" {
				continue
			}
			out := args[i+1]
			if !filepath.IsAbs(out) {
				cwd, err := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
				if err != nil {
					continue
				}
				out = filepath.Join(cwd, out)
			}
			if filepath.Clean(out) == filepath.Clean(bin) {
				return true
			}
		}
	}
	return false
}

// RepoRoot returns the directory holding kiln's go.mod, found by walking up
// from the test's working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(data, []byte("module github.com/kiln-build/kiln\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no kiln go.mod above the working directory")
		}
		dir = parent
	}
}
