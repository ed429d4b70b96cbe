package main

// Foreign platforms: the builder root carries QEMU user-mode emulators and
// one binfmt_misc registration line per emulator in binfmtConfDir
// (internal/builderimage writes them, with the F flag). /init registers
// them before the agent starts, because buildkitd probes binfmt_misc once,
// when it starts, to learn which platforms its worker runs. Init rather
// than the agent does it because it is machine setup like the other
// mounts, and because the agent also runs in-process on the host in
// tests, where it must not touch the host's handlers.

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	// binfmtConfDir is builderimage.BinfmtDir.
	binfmtConfDir = "/usr/lib/binfmt.d"
	binfmtMount   = "/proc/sys/fs/binfmt_misc"
)

// registerEmulators registers every emulator of the root with
// binfmt_misc. A failure is not fatal: the builder still builds its own
// platform, and only steps of the failed emulator's platforms cannot run.
// The failures are returned for reportBinfmt.
func registerEmulators() []error {
	confs, err := filepath.Glob(filepath.Join(binfmtConfDir, "*.conf"))
	if err != nil || len(confs) == 0 {
		return nil
	}
	if err := mountBinfmt(); err != nil {
		return []error{err}
	}
	var errs []error
	for _, conf := range confs {
		if err := registerBinfmt(conf); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// mountBinfmt mounts the binfmt_misc filesystem (its module is loaded with
// the others) unless the kernel already shows its register file there.
func mountBinfmt() error {
	if _, err := os.Stat(filepath.Join(binfmtMount, "register")); err == nil {
		return nil
	}
	if err := unix.Mount("binfmt_misc", binfmtMount, "binfmt_misc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("binfmt_misc: mount on %s: %w (is the binfmt_misc module in the image's module list?); foreign platforms cannot be emulated", binfmtMount, err)
	}
	return nil
}

// registerBinfmt writes the one registration line of conf to the register
// file, unless a handler of that name already exists.
func registerBinfmt(conf string) error {
	line, err := binfmtLine(conf)
	if err != nil {
		return fmt.Errorf("binfmt_misc: %w", err)
	}
	// :name:type:offset:magic:mask:interpreter:flags
	f := strings.Split(line, ":")
	if len(f) != 8 || f[0] != "" || f[1] == "" || strings.ContainsAny(f[1], "/.") {
		return fmt.Errorf("binfmt_misc: %s: %q is not a registration line", conf, line)
	}
	name, interp := f[1], f[6]
	if _, err := os.Stat(filepath.Join(binfmtMount, name)); err == nil {
		return nil
	}
	reg, err := os.OpenFile(filepath.Join(binfmtMount, "register"), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("binfmt_misc: register %s: %w", name, err)
	}
	defer reg.Close()
	// The kernel takes exactly one registration per write(2).
	if _, err := reg.Write([]byte(line)); err != nil {
		hint := ""
		if _, serr := os.Stat(interp); errors.Is(serr, fs.ErrNotExist) {
			hint = fmt.Sprintf(" (interpreter %s is missing from the root)", interp)
		}
		return fmt.Errorf("binfmt_misc: register %s from %s: %w%s", name, conf, err, hint)
	}
	return nil
}

// binfmtLine returns the first line of conf that is not blank or a
// comment (systemd-binfmt's format).
func binfmtLine(conf string) (string, error) {
	fh, err := os.Open(conf)
	if err != nil {
		return "", err
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l != "" && !strings.HasPrefix(l, "#") && !strings.HasPrefix(l, ";") {
			return l, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read %s: %w", conf, err)
	}
	return "", fmt.Errorf("%s has no registration line", conf)
}

// binfmtErrors is where failed registrations are written for the agent,
// which refuses jobs for foreign platforms with them instead of letting
// their steps fail with "exec format error" (internal/agent, Env.BinfmtErrors).
const binfmtErrors = "/run/kiln-binfmt.err"

// reportBinfmt prints failed registrations on the console and leaves them
// for the agent.
func reportBinfmt(errs []error) {
	if len(errs) == 0 {
		return
	}
	var b strings.Builder
	for _, err := range errs {
		fmt.Fprintf(os.Stderr, "kiln-init: %v; this builder cannot run steps of that platform, its own (linux/amd64) still builds\n", err)
		b.WriteString(err.Error() + "\n")
	}
	if err := os.WriteFile(binfmtErrors, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-init: write %s: %v\n", binfmtErrors, err)
	}
}
