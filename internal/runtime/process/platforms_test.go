package process

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// Handler files as the kernel shows them for Debian's qemu-user-static
// registrations (/usr/lib/binfmt.d/qemu-aarch64.conf, qemu-arm.conf).
const (
	aarch64Handler = `enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: POF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
`
	armHandler = `enabled
interpreter /usr/libexec/qemu-binfmt/arm-binfmt-P
flags: POF
offset 0
magic 7f454c4601010100000000000000000002002800
mask ffffffffffffff00fffffffffffffffffeffffff
`
	s390xNoFix = `enabled
interpreter /usr/bin/qemu-s390x
flags: OC
offset 0
magic 7f454c4602020100000000000000000000020016
mask ffffffffffffff00fffffffffffffffffffeffff
`
)

func fakeBinfmt(t *testing.T, status string, handlers map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{"status": status + "\n", "register": ""}
	for k, v := range handlers {
		files[k] = v
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestCheckPlatformsNeedsABinfmtHandler: the host's own platforms always
// build; a foreign one only with an enabled handler registered with F,
// found by the ELF machine in its magic whatever its name. Refusals are
// invalid input that name the platform, what the host builds, and the
// ways out.
func TestCheckPlatformsNeedsABinfmtHandler(t *testing.T) {
	native := []string{"linux/amd64", "linux/386"}
	none := fakeBinfmt(t, "enabled", nil)
	if err := checkPlatforms(none, native, []string{"linux/amd64", "linux/386"}); err != nil {
		t.Fatalf("native platforms: %v", err)
	}
	err := checkPlatforms(none, native, []string{"linux/amd64", "linux/arm64"})
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("arm64 without handlers: %v, want an invalid-request error", err)
	}
	for _, want := range []string{`"linux/arm64"`, "builds linux/386, linux/amd64", "no enabled binfmt_misc handler", "qemu-user-static", "vm runtime"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}

	// Named unlike Debian's: the magic decides.
	dir := fakeBinfmt(t, "enabled", map[string]string{"arm64-emu": aarch64Handler, "qemu-arm": armHandler, "qemu-s390x": s390xNoFix})
	if err := checkPlatforms(dir, native, []string{"linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6"}); err != nil {
		t.Fatalf("with aarch64 and arm handlers: %v", err)
	}
	err = checkPlatforms(dir, native, []string{"linux/s390x"})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "lacks the F (fix-binary) flag") || !strings.Contains(err.Error(), "linux/arm64") {
		t.Fatalf("s390x handler without F: %v", err)
	}
	if err := checkPlatforms(dir, native, []string{"linux/riscv64"}); err == nil || !strings.Contains(err.Error(), "no enabled binfmt_misc handler") {
		t.Fatalf("riscv64 without a handler: %v", err)
	}

	disabled := fakeBinfmt(t, "enabled", map[string]string{"qemu-aarch64": strings.Replace(aarch64Handler, "enabled", "disabled", 1)})
	if err := checkPlatforms(disabled, native, []string{"linux/arm64"}); err == nil || !strings.Contains(err.Error(), "qemu-aarch64 for it is disabled") {
		t.Fatalf("disabled handler: %v", err)
	}
	allOff := fakeBinfmt(t, "disabled", map[string]string{"qemu-aarch64": aarch64Handler})
	if err := checkPlatforms(allOff, native, []string{"linux/arm64"}); err == nil {
		t.Fatal("arm64 accepted while binfmt_misc is disabled as a whole")
	}
	if err := checkPlatforms(filepath.Join(none, "absent"), native, []string{"linux/arm64"}); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("binfmt_misc not mounted: %v", err)
	}
}

// TestHostRuns386Natively verifies the claim CheckPlatforms relies on for
// linux/386: the x86-64 kernel runs a 32-bit x86 executable itself.
func TestHostRuns386Natively(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("x86-64 hosts only")
	}
	if err := runs386(); err != nil {
		t.Fatalf("this x86-64 kernel does not run i386 executables (no IA32 emulation?): %v", err)
	}
	native := nativePlatforms()
	if len(native) != 2 || native[0] != "linux/amd64" || native[1] != "linux/386" {
		t.Fatalf("native platforms %v, want linux/amd64 and linux/386", native)
	}
}
