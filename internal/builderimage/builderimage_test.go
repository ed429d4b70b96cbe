package builderimage_test

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/testkit"
)

var (
	sharedOnce sync.Once
	sharedM    builderimage.Manifest
	sharedErr  error
	sharedTook time.Duration
)

// sharedImage builds the image once per test binary into a directory
// under os.TempDir shared with other packages' tests; Build itself skips
// the work when the inputs did not change since the last run.
func sharedImage(t *testing.T) builderimage.Manifest {
	t.Helper()
	sharedOnce.Do(func() {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		sharedM, sharedErr = builderimage.Build(ctx, builderimage.Options{
			OutputDir:       testkit.BuilderImageDir(),
			InstallPackages: true,
			Logger:          slog.New(slog.NewTextHandler(os.Stderr, nil)),
		})
		sharedTook = time.Since(start)
	})
	if sharedErr != nil {
		t.Fatalf("build builder image: %v", sharedErr)
	}
	return sharedM
}

func TestBuildProducesBootableParts(t *testing.T) {
	m := sharedImage(t)
	t.Logf("shared image %s in %s (built or reused in %s): vmlinux %d B, initramfs %d B, rootfs %d B",
		m.Digest, m.Dir, sharedTook.Round(time.Millisecond), m.Kernel.Size, m.Initramfs.Size, m.Rootfs.Size)

	// The kernel must be the uncompressed ELF with a PVH entry note, or
	// QEMU cannot boot it directly.
	f, err := elf.Open(m.KernelPath())
	if err != nil {
		t.Fatalf("vmlinux is not ELF: %v", err)
	}
	defer f.Close()
	if !hasPVHNote(t, f) {
		t.Fatalf("vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); QEMU cannot boot it uncompressed")
	}
	if want := []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk"}; len(m.Modules) < 4 || strings.Join(m.Modules[:4], ",") != strings.Join(want, ",") {
		t.Fatalf("modules start %v, want %v first", m.Modules, want)
	}
	if m.Components.BuildKit == "" || m.Components.Runc == "" || m.Components.Go == "" || m.Components.QEMU == "" {
		t.Fatalf("components not recorded: %+v", m.Components)
	}
	if got := strings.Join(m.Native, ","); got != "linux/amd64,linux/386" {
		t.Errorf("native platforms %s, want linux/amd64,linux/386 (Debian's kernel runs 32-bit x86)", got)
	}
	if got, want := strings.Join(m.Emulates, ","), "linux/arm/v6,linux/arm/v7,linux/arm64,linux/ppc64le,linux/riscv64,linux/s390x"; got != want {
		t.Errorf("emulated platforms %s, want %s", got, want)
	}
	if !slices.Contains(m.Modules, "binfmt_misc") {
		t.Errorf("modules %v lack binfmt_misc: the emulators could not be registered", m.Modules)
	}
}

func hasPVHNote(t *testing.T, f *elf.File) bool {
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			t.Fatal(err)
		}
		for len(b) >= 12 {
			nameSz := binary.LittleEndian.Uint32(b[0:])
			descSz := binary.LittleEndian.Uint32(b[4:])
			typ := binary.LittleEndian.Uint32(b[8:])
			name := b[12 : 12+nameSz]
			if strings.TrimRight(string(name), "\x00") == "Xen" && typ == 18 {
				return true
			}
			adv := 12 + int((nameSz+3)&^3) + int((descSz+3)&^3)
			if adv > len(b) {
				break
			}
			b = b[adv:]
		}
	}
	return false
}

func TestBuildIsReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the image twice from scratch")
	}
	ctx := context.Background()
	var ms []builderimage.Manifest
	for i := 0; i < 2; i++ {
		start := time.Now()
		m, err := builderimage.Build(ctx, builderimage.Options{OutputDir: t.TempDir()})
		if err != nil {
			t.Fatalf("build %d: %v", i, err)
		}
		t.Logf("fresh build %d: %s in %s", i, m.Digest, time.Since(start).Round(time.Millisecond))
		ms = append(ms, m)
	}
	a, b := ms[0], ms[1]
	for _, pair := range [][2]builderimage.File{{a.Kernel, b.Kernel}, {a.Initramfs, b.Initramfs}, {a.Rootfs, b.Rootfs}} {
		if pair[0] != pair[1] {
			t.Errorf("%s differs between builds: %+v vs %+v", pair[0].Name, pair[0], pair[1])
		}
	}
	if a.Digest != b.Digest || a.InputsDigest != b.InputsDigest {
		t.Fatalf("digests differ: %s/%s vs %s/%s", a.Digest, a.InputsDigest, b.Digest, b.InputsDigest)
	}
	// The shared image came from an earlier build, possibly in another
	// process, and must match too.
	if s := sharedImage(t); s.Digest != a.Digest {
		t.Fatalf("fresh build %s differs from the shared image %s", a.Digest, s.Digest)
	}
}

func TestRebuildIsUpToDateAndLoadReadsIt(t *testing.T) {
	m := sharedImage(t)
	before, err := os.Stat(m.RootfsPath())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	again, err := builderimage.Build(context.Background(), builderimage.Options{OutputDir: m.Dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("up-to-date rebuild took %s", time.Since(start).Round(time.Millisecond))
	after, err := os.Stat(m.RootfsPath())
	if err != nil {
		t.Fatal(err)
	}
	if again.Digest != m.Digest || !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Fatalf("rebuild with unchanged inputs rewrote the image (digest %s -> %s)", m.Digest, again.Digest)
	}

	loaded, err := builderimage.Load(m.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Digest != m.Digest || loaded.KernelPath() != m.KernelPath() || strings.Join(loaded.Modules, ",") != strings.Join(m.Modules, ",") {
		t.Fatalf("Load returned %+v, want %+v", loaded, m)
	}
	if err := loaded.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestLoadRejectsMissingAndTamperedImages(t *testing.T) {
	m := sharedImage(t)
	if _, err := builderimage.Load(t.TempDir()); err == nil || !strings.Contains(err.Error(), "builder-image build") {
		t.Fatalf("Load of an empty dir: %v, want a hint to build one", err)
	}

	// A copy whose initramfs was altered in place (same size) loads but
	// fails Verify; a truncated one fails Load.
	dir := t.TempDir()
	for _, name := range []string{"manifest.json", m.Kernel.Name, m.Initramfs.Name, m.Rootfs.Name} {
		if err := copyFile(filepath.Join(m.Dir, name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(dir, m.Initramfs.Name)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xFF
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	tampered, err := builderimage.Load(dir)
	if err != nil {
		t.Fatalf("Load of a same-size copy: %v", err)
	}
	if err := tampered.Verify(); err == nil || !strings.Contains(err.Error(), m.Initramfs.Name) {
		t.Fatalf("Verify of a tampered initramfs: %v, want an error naming it", err)
	}
	if err := os.WriteFile(p, b[:len(b)-1], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := builderimage.Load(dir); err == nil || !strings.Contains(err.Error(), "rebuild") {
		t.Fatalf("Load of a truncated initramfs: %v, want an error", err)
	}
}

// TestRootfsRunsItsBinaries unpacks the erofs root and runs runc and
// buildkitd from it under chroot: proves the image carries every shared
// library runc needs and that buildkitd is self-contained.
func TestRootfsRunsItsBinaries(t *testing.T) {
	m := sharedImage(t)
	if _, err := exec.LookPath("fsck.erofs"); err != nil {
		t.Fatalf("fsck.erofs (erofs-utils) is needed to unpack the root: %v", err)
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	if out, err := exec.Command("fsck.erofs", "--extract="+root, m.RootfsPath()).CombinedOutput(); err != nil {
		t.Fatalf("fsck.erofs --extract: %v\n%s", err, out)
	}
	for _, p := range []string{"/dev", "/proc", "/sys", "/run", "/tmp", "/var/lib/buildkit", "/etc/passwd", "/etc/hosts", "/usr/bin/kiln-agent"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Errorf("root filesystem lacks %s: %v", p, err)
		}
	}
	st, err := os.Stat(filepath.Join(root, "usr/bin/buildkitd"))
	if err != nil {
		t.Fatal(err)
	}
	if !st.ModTime().Equal(time.Unix(0, 0)) {
		t.Errorf("buildkitd mtime %s, want the fixed epoch", st.ModTime())
	}
	// The emulators run from the root as they are (static), and each has
	// its registration line naming it, with the fix-binary flag.
	for _, name := range builderimage.DefaultEmulators {
		conf, err := os.ReadFile(filepath.Join(root, builderimage.BinfmtDir, "qemu-"+name+".conf"))
		if err != nil {
			t.Fatalf("emulator %s has no binfmt_misc registration: %v", name, err)
		}
		line := strings.TrimSpace(string(conf))
		if want := ":/usr/bin/qemu-" + name + "-static:" + builderimage.BinfmtFlags; !strings.HasPrefix(line, ":qemu-"+name+":M::\\x7f\\x45\\x4c\\x46") || !strings.HasSuffix(line, want) {
			t.Errorf("registration of %s is %q, want an ELF magic entry ending %q", name, line, want)
		}
	}
	for _, c := range [][]string{{"/usr/sbin/runc", "--version"}, {"/usr/bin/buildkitd", "--version"}, {"/usr/bin/qemu-aarch64-static", "--version"}} {
		out, err := exec.Command("chroot", append([]string{root}, c...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("chroot %s: %v\n%s", strings.Join(c, " "), err, out)
		}
		t.Logf("%s: %s", c[0], firstLine(out))
	}
}

// TestInitramfsLoadsModulesForThisKernel reads the cpio back: /init must
// be static, the load order must be the manifest's, and every module must
// carry the kernel's vermagic or finit_module would refuse it at boot.
func TestInitramfsLoadsModulesForThisKernel(t *testing.T) {
	m := sharedImage(t)
	b, err := os.ReadFile(m.InitramfsPath())
	if err != nil {
		t.Fatal(err)
	}
	files, err := readNewc(b)
	if err != nil {
		t.Fatal(err)
	}
	initBin, ok := files["init"]
	if !ok {
		t.Fatal("initramfs has no /init")
	}
	f, err := elf.NewFile(bytes.NewReader(initBin.data))
	if err != nil {
		t.Fatalf("/init is not ELF: %v", err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("/init is dynamically linked; it must be static")
		}
	}
	if initBin.mode&0o111 == 0 {
		t.Fatalf("/init mode %o is not executable", initBin.mode)
	}
	if c, ok := files["dev/console"]; !ok || c.mode&0o170000 != 0o020000 {
		t.Fatal("initramfs lacks the /dev/console character device")
	}
	order := strings.Fields(string(files["kiln/modules.order"].data))
	if len(order) != len(m.Modules) {
		t.Fatalf("modules.order %v, manifest %v", order, m.Modules)
	}
	for i, name := range order {
		if name != m.Modules[i]+".ko" {
			t.Fatalf("module %d is %s, manifest says %s", i, name, m.Modules[i])
		}
		mod := files["kiln/modules/"+name].data
		if !bytes.Contains(mod, []byte("vermagic="+m.KernelVersion+" ")) {
			t.Fatalf("module %s is not built for kernel %s", name, m.KernelVersion)
		}
	}
}

type cpioFile struct {
	mode uint32
	data []byte
}

func readNewc(b []byte) (map[string]cpioFile, error) {
	out := map[string]cpioFile{}
	pad := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			return nil, fmt.Errorf("bad newc header at %d", off)
		}
		field := func(i int) int {
			v, _ := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			return int(v)
		}
		mode, size, nameSize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+nameSize-1])
		dataOff := pad(off + 110 + nameSize)
		if name == "TRAILER!!!" {
			return out, nil
		}
		out[name] = cpioFile{mode: uint32(mode), data: b[dataOff : dataOff+size]}
		off = pad(dataOff + size)
	}
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}
