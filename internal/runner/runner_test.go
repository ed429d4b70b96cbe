package runner_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/runner"
	"github.com/kiln-build/kiln/internal/testkit"
)

// TestRun boots a busybox image built in the test, pushed to a real
// registry and converted to erofs, in real QEMU microVMs: one boot per
// subtest.
func TestRun(t *testing.T) {
	m := builderImage(t)
	art := testImage(t, v1.ImageConfig{
		User:       "app",
		WorkingDir: "/home/app/work", // not in the image: created at run time
		Env:        []string{"GREETING=hello world"},
		Cmd: []string{"sh", "-c", `echo "hello from $HOSTNAME"; id -u; id -G; pwd; echo "$GREETING"; echo "$HOME"; echo "$PATH"; ulimit -n` +
			`; echo "to stderr" >&2`},
	})
	spec := func() runner.Spec {
		return runner.Spec{
			Image:    m,
			RootFS:   art.RootFS(),
			Config:   art.Config,
			Hostname: "testhost",
			Console:  consoleWriter(),
		}
	}
	erofsSum := testkit.FileDigest(t, art.RootFS())

	t.Run("image config", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		stdout, stderr := newOutput(""), newOutput("")
		start := time.Now()
		code, err := runner.Run(ctx, spec(), stdout, stderr)
		took := time.Since(start)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		if code != 0 {
			t.Errorf("exit code %d, want 0; stderr: %q", code, stderr)
		}
		want := strings.Join([]string{
			"hello from testhost",
			"1000",      // User "app" from the image's passwd
			"1000 2000", // its primary group and "extra" from /etc/group
			"/home/app/work",
			"hello world", // Env from the config
			"/home/app",   // HOME from passwd
			runner.DefaultPath,
			"1048576", // open files, as in Docker
		}, "\n") + "\n"
		if got := stdout.String(); got != want {
			t.Errorf("stdout:\n%s\nwant:\n%s", got, want)
		}
		if got := stderr.String(); got != "to stderr\n" {
			t.Errorf("stderr %q, want %q", got, "to stderr\n")
		}
		t.Logf("run took %s; boot to first output %s", took.Round(time.Millisecond), stdout.firstWrite().Sub(start).Round(time.Millisecond))
	})

	t.Run("override command writes to the root", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		s := spec()
		s.User = "0"
		s.Env = []string{"GREETING=override", "EXTRA=1"}
		s.Args = []string{"sh", "-c", strings.Join([]string{
			"set -e",
			"echo new > /newfile; cat /newfile", // a new file in /
			"cat /etc/marker",                   // the image's file...
			"echo changed >> /etc/marker; cat /etc/marker", // ...copied up and changed
			"rm /bin/hostname; test ! -e /bin/hostname; echo removed",
			`echo "$GREETING $EXTRA"`,
			"echo oops >&2",
			"exit 3",
		}, "\n")}
		stdout, stderr := newOutput(""), newOutput("")
		code, err := runner.Run(ctx, s, stdout, stderr)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		if code != 3 {
			t.Errorf("exit code %d, want 3", code)
		}
		if want := "new\noriginal\noriginal\nchanged\nremoved\noverride 1\n"; stdout.String() != want {
			t.Errorf("stdout %q, want %q", stdout, want)
		}
		if stderr.String() != "oops\n" {
			t.Errorf("stderr %q, want %q", stderr, "oops\n")
		}
		// The writes lived in the VM's overlay only.
		if got := testkit.FileDigest(t, art.RootFS()); got != erofsSum {
			t.Errorf("the erofs image changed: %s, was %s", got, erofsSum)
		}
		mnt := mountErofs(t, art.RootFS())
		if _, err := os.Lstat(filepath.Join(mnt, "newfile")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/newfile is in the image after the run: %v", err)
		}
		if b, _ := os.ReadFile(filepath.Join(mnt, "etc/marker")); string(b) != "original\n" {
			t.Errorf("/etc/marker in the image is %q after the run", b)
		}
		if _, err := os.Lstat(filepath.Join(mnt, "bin/hostname")); err != nil {
			t.Errorf("/bin/hostname is gone from the image after the run: %v", err)
		}
	})

	t.Run("command not found", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		s := spec()
		s.Args = []string{"no-such-command", "x"}
		code, err := runner.Run(ctx, s, nil, nil)
		var se *runner.StartError
		if !errors.As(err, &se) {
			t.Fatalf("err = %v, want a *runner.StartError", err)
		}
		if code != 127 || se.Code != 127 {
			t.Errorf("exit code %d (StartError %d), want 127", code, se.Code)
		}
		if !strings.Contains(err.Error(), `"no-such-command"`) || !strings.Contains(err.Error(), "not found") {
			t.Errorf("error %q does not say which command was not found", err)
		}
	})

	t.Run("cancel stops the process", func(t *testing.T) {
		// The shell shows that the stop signal reaches the process; the
		// sleep it leaves behind must not keep the VM alive.
		code, stdout, took := cancelRun(t, spec(), `trap 'echo stopping; exit 7' TERM; echo ready; sleep 60 & wait`)
		if code != 7 || stdout != "ready\nstopping\n" {
			t.Errorf("exit code %d, stdout %q; want 7 and the trap's output (the stop signal should reach the process)", code, stdout)
		}
		t.Logf("cancel to return %s", took.Round(time.Millisecond))
	})

	t.Run("cancel kills a process ignoring the stop signal", func(t *testing.T) {
		s := spec()
		s.StopTimeout = 500 * time.Millisecond
		code, stdout, took := cancelRun(t, s, `trap '' TERM; echo ready; sleep 60`)
		if code != -1 || stdout != "ready\n" {
			t.Errorf("exit code %d, stdout %q; want -1 (no exit status: the VM was killed)", code, stdout)
		}
		if took < s.StopTimeout {
			t.Errorf("Run returned %s after cancel, before the %s stop timeout", took, s.StopTimeout)
		}
		t.Logf("cancel to return %s", took.Round(time.Millisecond))
	})
}

// cancelRun runs script, cancels the run once it printed "ready", and
// checks Run returns within 2s with context.Canceled and leaves no QEMU.
func cancelRun(t *testing.T, s runner.Spec, script string) (code int, stdout string, took time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s.Args = []string{"sh", "-c", script}
	out := newOutput("ready\n")
	type result struct {
		code int
		err  error
	}
	res := make(chan result, 1)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		code, err := runner.Run(runCtx, s, out, nil)
		res <- result{code, err}
	}()
	select {
	case <-out.seen: // output streams while the process runs
	case r := <-res:
		t.Fatalf("run ended before the process was ready: code %d, err %v, stdout %q", r.code, r.err, out)
	case <-ctx.Done():
		t.Fatal("the process never said ready")
	}
	if pids := qemuFor(s.RootFS); len(pids) != 1 {
		t.Fatalf("want one QEMU for the run, found %v", pids)
	}
	stop()
	canceled := time.Now()
	var r result
	select {
	case r = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("Run still running 10s after cancel")
	}
	took = time.Since(canceled)
	if took > 2*time.Second {
		t.Errorf("Run returned %s after cancel, want within 2s", took)
	}
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", r.err)
	}
	if pids := qemuFor(s.RootFS); len(pids) != 0 {
		t.Errorf("QEMU still running after Run returned: %v", pids)
	}
	return r.code, out.String(), took
}

// TestRunRejectsBadSpecs checks what needs no VM fails before one starts.
func TestRunRejectsBadSpecs(t *testing.T) {
	dir := t.TempDir()
	fs := filepath.Join(dir, "rootfs.erofs")
	if err := os.WriteFile(fs, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	m := builderimage.Manifest{Dir: dir}
	for _, tc := range []struct {
		name string
		spec runner.Spec
		want string
	}{
		{"no builder image", runner.Spec{RootFS: fs, Config: rootfs.ImageConfig{Cmd: []string{"sh"}}}, "no builder image"},
		{"no rootfs", runner.Spec{Image: m, Config: rootfs.ImageConfig{Cmd: []string{"sh"}}}, "no root filesystem"},
		{"missing rootfs", runner.Spec{Image: m, RootFS: filepath.Join(dir, "nope"), Config: rootfs.ImageConfig{Cmd: []string{"sh"}}}, "no such file"},
		{"nothing to run", runner.Spec{Image: m, RootFS: fs}, "no entrypoint or cmd"},
		{"bad env", runner.Spec{Image: m, RootFS: fs, Config: rootfs.ImageConfig{Cmd: []string{"sh"}}, Env: []string{"NOEQUALS"}}, "KEY=VALUE"},
		{"bad stop signal", runner.Spec{Image: m, RootFS: fs, Config: rootfs.ImageConfig{Cmd: []string{"sh"}, StopSignal: "SIGNOPE"}}, "stop signal"},
		{"relative workdir", runner.Spec{Image: m, RootFS: fs, Config: rootfs.ImageConfig{Cmd: []string{"sh"}, WorkingDir: "app"}}, "not absolute"},
		{"bad hostname", runner.Spec{Image: m, RootFS: fs, Config: rootfs.ImageConfig{Cmd: []string{"sh"}}, Hostname: "a b"}, "hostname"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, err := runner.Run(context.Background(), tc.spec, nil, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
			if code == 0 {
				t.Errorf("exit code 0 with an error")
			}
		})
	}
}
