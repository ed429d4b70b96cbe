package testkit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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
	if p := os.Getenv("KILN_BUILDKITD"); p != "" {
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("KILN_BUILDKITD=%s: %w", p, err)
		}
		return p, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "bin", "buildkitd")

	// Someone may be running `go build -o bin/buildkitd` by hand; its output
	// is not complete until that command exits.
	if err := waitForForeignBuild(bin, 30*time.Minute); err != nil {
		return "", err
	}
	if checkExecutable(bin) == nil {
		return bin, nil
	}

	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(bin), err)
	}
	// Test binaries of several packages run in parallel; the lock makes
	// exactly one of them build while the others wait for the result.
	lock, err := os.OpenFile(bin+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if checkExecutable(bin) == nil {
		return bin, nil
	}

	tmp := fmt.Sprintf("%s.tmp-%d", bin, os.Getpid())
	cmd := exec.Command("go", "build", "-o", tmp, "github.com/moby/buildkit/cmd/buildkitd")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build buildkitd (set KILN_BUILDKITD to use a prebuilt one): %w\n%s", err, out.String())
	}
	if err := os.Rename(tmp, bin); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("install buildkitd: %w", err)
	}
	return bin, nil
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
