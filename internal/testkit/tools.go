package testkit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// goTool returns the path of a server binary the tests run, built from a
// Go module go.mod pins (a tool directive): $env if set, else
// <repo>/bin/<name>, built from pkg the first time and again when stale
// says the existing one is out of date, with buildEnv added to the
// build's environment. Test binaries of several packages run in
// parallel; a file lock makes exactly one of them build while the others
// wait for its result.
func goTool(env, name, pkg string, stale func(bin, root string) bool, buildEnv ...string) (string, error) {
	if p := os.Getenv(env); p != "" {
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", env, p, err)
		}
		return p, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "bin", name)
	usable := func() bool { return checkExecutable(bin) == nil && (stale == nil || !stale(bin, root)) }
	// Someone may be running `go build -o bin/<name>` by hand (make
	// build does for buildkitd); its output is not complete until that
	// command exits.
	if err := waitForForeignBuild(bin, 30*time.Minute); err != nil {
		return "", err
	}
	if usable() {
		return bin, nil
	}
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(bin), err)
	}
	lock, err := os.OpenFile(bin+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if usable() {
		return bin, nil
	}
	tmp := fmt.Sprintf("%s.tmp-%d", bin, os.Getpid())
	cmd := exec.Command("go", "build", "-o", tmp, pkg)
	cmd.Dir = root
	cmd.Env = append(append(os.Environ(), "GOFLAGS=-mod=mod"), buildEnv...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build %s (set %s to use a prebuilt one): %w\n%s", name, env, err, out.String())
	}
	if err := os.Rename(tmp, bin); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("install %s: %w", name, err)
	}
	return bin, nil
}
