package testkit

import (
	"debug/elf"
	"fmt"
	"path/filepath"
	"testing"
)

// BusyboxArm64 returns the path of a static arm64 busybox,
// <repo>/bin/busybox-arm64, for multi-platform builds (FROM scratch plus
// COPY busybox-$TARGETARCH). `make bin/busybox-arm64` unpacks it from
// Debian's busybox-static:arm64; a test that needs it fails saying so
// when it is missing.
func BusyboxArm64(t testing.TB) string {
	t.Helper()
	p, err := BusyboxArm64Path()
	if err != nil {
		t.Fatalf("arm64 busybox: %v", err)
	}
	return p
}

// BusyboxArm64Path is BusyboxArm64 for code without a testing.TB.
func BusyboxArm64Path() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "bin", "busybox-arm64")
	if err := checkExecutable(p); err != nil {
		return "", fmt.Errorf("%w; run `make bin/busybox-arm64` in %s", err, root)
	}
	f, err := elf.Open(p)
	if err != nil {
		return "", fmt.Errorf("%s: %w; delete it and run `make bin/busybox-arm64`", p, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_AARCH64 || !isStaticBusybox(p) {
		return "", fmt.Errorf("%s is not a static arm64 executable (%s); delete it and run `make bin/busybox-arm64`", p, f.Machine)
	}
	return p, nil
}
