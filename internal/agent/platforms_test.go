package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckEmulationRefusesForeignPlatformsAfterFailedRegistration: with
// kiln-init's error file present, a job for arm64 is refused with the
// registration error and the way out; the builder's own platforms, and
// every platform when registration went well, pass.
func TestCheckEmulationRefusesForeignPlatformsAfterFailedRegistration(t *testing.T) {
	dir := t.TempDir()
	errFile := filepath.Join(dir, "binfmt.err")
	if err := checkEmulation(errFile, []string{"linux/amd64", "linux/arm64"}); err != nil {
		t.Fatalf("no error file: %v", err)
	}
	msg := "binfmt_misc: register qemu-aarch64 from /usr/lib/binfmt.d/qemu-aarch64.conf: invalid argument"
	if err := os.WriteFile(errFile, []byte(msg+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, native := range [][]string{nil, {"linux/amd64"}, {"linux/amd64", "linux/386"}} {
		if err := checkEmulation(errFile, native); err != nil {
			t.Errorf("%v: %v, want the builder's own platforms to build", native, err)
		}
	}
	err := checkEmulation(errFile, []string{"linux/amd64", "linux/arm64"})
	if err == nil || !strings.Contains(err.Error(), "linux/arm64") || !strings.Contains(err.Error(), msg) || !strings.Contains(err.Error(), "builder-image build") {
		t.Fatalf("arm64 after a failed registration: %v, want an error naming the platform, the failure and the fix", err)
	}
	if err := checkEmulation("", []string{"linux/arm64"}); err != nil {
		t.Fatalf("no error file configured (the host): %v", err)
	}
}
