package builderimage

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestExtractVmlinuxMatchesXZ decodes the installed kernel's payload with
// the Go decoder (LZMA2 + x86 BCJ) and compares it with xz(1), the way the
// kernel tree's extract-vmlinux does it.
func TestExtractVmlinuxMatchesXZ(t *testing.T) {
	version, err := findKernel("/boot", "/lib/modules", "")
	if err != nil {
		t.Fatal(err)
	}
	bz, err := os.ReadFile("/boot/vmlinuz-" + version)
	if err != nil {
		t.Fatal(err)
	}
	got, err := extractVmlinux(bz, version)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("xz"); err != nil {
		t.Logf("xz not installed; checked only that the result is the %s ELF kernel", version)
		return
	}
	i := bytes.Index(bz, xzMagic)
	cmd := exec.Command("xz", "-dc")
	cmd.Stdin = bytes.NewReader(bz[i:])
	// xz complains about the bytes after the stream but has written the
	// whole payload by then.
	want, _ := cmd.Output()
	if len(want) == 0 {
		t.Fatal("xz produced nothing")
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Go decoder gives %d bytes, xz %d; contents differ", len(got), len(want))
	}

	// A corrupted payload must be refused, not booted.
	bad := append([]byte(nil), bz...)
	bad[i+len(bz[i:])/3] ^= 0x55
	if _, err := extractVmlinux(bad, version); err == nil {
		t.Fatal("corrupted kernel payload was accepted")
	}
}

func TestVersionLess(t *testing.T) {
	ordered := []string{"5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"}
	for i := range ordered {
		for j := range ordered {
			if got := versionLess(ordered[i], ordered[j]); got != (i < j) {
				t.Errorf("versionLess(%s, %s) = %v", ordered[i], ordered[j], got)
			}
		}
	}
}

func TestResolveModulesChecksOrder(t *testing.T) {
	version, err := findKernel("/boot", "/lib/modules", "")
	if err != nil {
		t.Fatal(err)
	}
	mods, _, err := resolveModules("/lib/modules", version, DefaultModules)
	if err != nil {
		t.Fatalf("default module list: %v", err)
	}
	for _, m := range mods {
		if _, err := readModule(m.Path); err != nil {
			t.Fatal(err)
		}
	}
	// ext4 before jbd2 cannot load: finit_module would fail at boot.
	_, _, err = resolveModules("/lib/modules", version, []string{"virtio_ring", "virtio", "ext4"})
	if err == nil || !strings.Contains(err.Error(), "ext4 needs") {
		t.Fatalf("ext4 without its dependencies: %v, want an error naming the missing dependency", err)
	}
	if _, _, err := resolveModules("/lib/modules", version, []string{"no_such_module"}); err == nil {
		t.Fatal("unknown module accepted")
	}
}

func TestCpioIsDeterministicAndComplete(t *testing.T) {
	entries := []cpioEntry{
		{Path: "kiln/b", Mode: 0o644, Data: []byte("b")},
		{Path: "kiln", Mode: fs.ModeDir | 0o755},
		{Path: "kiln/a", Mode: 0o644, Data: []byte("aaaaa")},
	}
	var x, y bytes.Buffer
	if err := writeCpio(&x, entries); err != nil {
		t.Fatal(err)
	}
	if err := writeCpio(&y, []cpioEntry{entries[2], entries[0], entries[1]}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x.Bytes(), y.Bytes()) {
		t.Fatal("entry order changes the archive")
	}
	if x.Len()%4 != 0 || !bytes.Contains(x.Bytes(), []byte("TRAILER!!!")) {
		t.Fatal("archive is not padded or lacks the trailer")
	}
	if err := writeCpio(&x, []cpioEntry{{Path: "orphan/file", Mode: 0o644}}); err == nil {
		t.Fatal("entry without its directory accepted; the kernel would drop it")
	}
}

func TestSharedLibsOfRunc(t *testing.T) {
	files, err := sharedLibs("/usr/sbin/runc")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range files {
		paths = append(paths, f.Path)
	}
	got := strings.Join(paths, " ")
	for _, want := range []string{"/usr/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libseccomp.so.2"} {
		if !strings.Contains(got, want) {
			t.Errorf("runc's libraries %v lack %s", paths, want)
		}
	}
	if err := isStatic("/usr/sbin/runc"); err == nil {
		t.Fatal("runc reported static")
	}
}

func TestFindSourceDir(t *testing.T) {
	wd, _ := os.Getwd()
	dir, err := findSourceDir(wd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cmd", "kiln-agent")); err != nil {
		t.Fatalf("source dir %s has no cmd/kiln-agent", dir)
	}
	if _, err := findSourceDir(t.TempDir()); err == nil {
		t.Fatal("found a kiln source tree in an empty temp dir")
	}
}

// TestRewriteBinfmtKeepsDebiansMagic: every default emulator's line is
// Debian's with our interpreter and flags, and a line whose magic names
// another machine than the emulator runs is refused.
func TestRewriteBinfmtKeepsDebiansMagic(t *testing.T) {
	for _, name := range DefaultEmulators {
		line, err := readBinfmtLine(filepath.Join(hostBinfmtDir, "qemu-"+name+".conf"))
		if err != nil {
			t.Fatalf("%v (is qemu-user-static installed?)", err)
		}
		got, err := rewriteBinfmt(line, "qemu-"+name, emulatorPath(name), qemuTargets[name])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		f, g := strings.Split(line, ":"), strings.Split(got, ":")
		if strings.Join(f[:6], ":") != strings.Join(g[:6], ":") || g[6] != "/usr/bin/qemu-"+name+"-static" || g[7] != BinfmtFlags {
			t.Errorf("%s: %q rewritten to %q", name, line, got)
		}
	}
	arm, err := readBinfmtLine(filepath.Join(hostBinfmtDir, "qemu-arm.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rewriteBinfmt(strings.Replace(arm, "qemu-arm", "qemu-aarch64", 1), "qemu-aarch64", emulatorPath("aarch64"), qemuTargets["aarch64"]); err == nil {
		t.Fatal("arm's magic accepted for the aarch64 emulator")
	}
}
