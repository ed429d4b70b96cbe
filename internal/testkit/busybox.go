package testkit

import (
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// BusyboxSource is the static busybox binary BusyboxDir copies; Debian's
// busybox-static package installs it.
const BusyboxSource = "/bin/busybox"

// BusyboxDockerfile builds a minimal base image with a shell from a build
// context holding only a static busybox binary, so tests need no public
// registry.
const BusyboxDockerfile = `FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
`

var installBusybox sync.Once

// BusyboxDir returns a fresh build context directory (Dockerfile plus a
// static busybox binary) that builds a busybox base image. Tests usually
// build it once, push it as <registry>/base/busybox:latest and use
// `FROM <registry>/base/busybox:latest` afterwards.
func BusyboxDir(t testing.TB) string {
	t.Helper()
	if !isStaticBusybox(BusyboxSource) {
		installBusybox.Do(func() {
			out, err := exec.Command("apt-get", "install", "-y", "busybox-static").CombinedOutput()
			if err != nil {
				t.Logf("apt-get install busybox-static: %v\n%s", err, out)
			}
		})
		if !isStaticBusybox(BusyboxSource) {
			t.Fatalf("%s is missing or not a static binary; install Debian's busybox-static", BusyboxSource)
		}
	}
	dir := t.TempDir()
	if err := copyFile(BusyboxSource, filepath.Join(dir, "busybox"), 0o755); err != nil {
		t.Fatalf("copy busybox into build context: %v", err)
	}
	WriteFiles(t, dir, map[string]string{"Dockerfile": BusyboxDockerfile})
	return dir
}

// WriteFiles writes name→content pairs below dir, creating parent
// directories as needed.
func WriteFiles(t testing.TB, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// ContextDir is a new temporary build context holding files.
func ContextDir(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	WriteFiles(t, dir, files)
	return dir
}

// isStaticBusybox reports whether p is an ELF without a program interpreter,
// i.e. one that runs inside a FROM scratch image.
func isStaticBusybox(p string) bool {
	f, err := elf.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
