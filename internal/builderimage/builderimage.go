package builderimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Boot contract constants shared with the vm runtime and the agent.
const (
	// RootSerial is the virtio-blk serial of the read-only erofs root disk.
	RootSerial = "kiln-root"
	// AgentPort is the name of the virtio-serial port that carries the
	// host↔agent channel.
	AgentPort = "kiln.0"
	// AgentPath is the agent binary inside the root filesystem.
	AgentPath = "/usr/bin/kiln-agent"
	// CacheSerial is the serial the vm runtime gives the build's ext4
	// cache volume; the agent finds it by this serial and mounts it at
	// CacheMountPoint.
	CacheSerial = "kiln-cache"
	// CacheMountPoint is the empty directory in the root filesystem where
	// the agent mounts the build's cache volume.
	CacheMountPoint = "/var/lib/buildkit"

	// FormatVersion changes whenever the layout or the boot contract
	// changes in a way the vm runtime must know about.
	// Version 2: the root carries QEMU user-mode emulators and their
	// binfmt_misc registrations, which /init registers; the manifest lists
	// the platforms the image builds (Native, Emulates).
	FormatVersion = 2

	manifestName  = "manifest.json"
	kernelName    = "vmlinux"
	initramfsName = "initramfs.cpio"
	rootfsName    = "rootfs.erofs"
)

// Options says where the image goes and what it is made from. Zero values
// pick what is installed on the machine.
type Options struct {
	// OutputDir receives vmlinux, initramfs.cpio, rootfs.erofs and
	// manifest.json. If it already holds an image built from the same
	// inputs, Build returns that image without rebuilding.
	OutputDir string

	// SourceDir is the kiln module source tree; kiln-agent, kiln-init and
	// buildkitd are built from it. Default: the first directory holding
	// kiln's go.mod above the working directory.
	SourceDir string
	// AgentBinary, InitBinary and BuildkitdBinary are prebuilt static
	// binaries used instead of building them from SourceDir.
	AgentBinary     string
	InitBinary      string
	BuildkitdBinary string

	// KernelVersion selects /boot/vmlinuz-<version>; default the newest
	// installed kernel whose modules are present.
	KernelVersion string
	// Modules are loaded by init in this order; default DefaultModules.
	Modules []string
	// Runc is the runc binary copied into the image (default
	// /usr/sbin/runc), together with the shared libraries it needs.
	Runc string
	// Emulators are the QEMU user-mode targets (qemu-<name>-static from
	// qemu-user-static) the image carries for foreign platforms; nil
	// means DefaultEmulators, empty none.
	Emulators []string

	// InstallPackages lets Build apt-get install the Debian packages it
	// needs (linux-image-amd64, erofs-utils, runc, qemu-user-static) when
	// they are missing.
	InstallPackages bool

	Logger *slog.Logger
}

// Manifest describes a built image. It is stored as manifest.json next to
// the image files.
type Manifest struct {
	FormatVersion int `json:"format_version"`
	// Digest identifies the bootable image: sha256 over the lines
	// "vmlinux <sha256>\ninitramfs.cpio <sha256>\nrootfs.erofs <sha256>\n".
	Digest string `json:"digest"`
	// InputsDigest identifies what the image was built from; Build skips
	// rebuilding when it matches.
	InputsDigest string `json:"inputs_digest"`

	KernelVersion string `json:"kernel_version"`
	Kernel        File   `json:"kernel"`
	Initramfs     File   `json:"initramfs"`
	Rootfs        File   `json:"rootfs"`

	// Modules are the modules init loads, in order; BuiltinModules were
	// requested but are compiled into the kernel.
	Modules        []string `json:"modules"`
	BuiltinModules []string `json:"builtin_modules,omitempty"`
	// Cmdline is what the image needs on the kernel command line in
	// addition to the launcher's console/reboot settings.
	Cmdline    []string `json:"cmdline"`
	RootSerial string   `json:"root_serial"`
	AgentPort  string   `json:"agent_port"`
	// Native are the platforms the VM runs without emulation (linux/amd64,
	// and linux/386 when the kernel runs 32-bit x86); Emulates those its
	// QEMU user-mode emulators run, registered with binfmt_misc at boot.
	// Both are os/arch[/variant], sorted.
	Native   []string `json:"native"`
	Emulates []string `json:"emulates"`

	Components Components `json:"components"`

	// Dir is the directory the manifest was loaded from or built into.
	Dir string `json:"-"`
}

// File is one image file, relative to the manifest's directory.
type File struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Components records what went into the image, for humans and for the
// build's dedup key.
type Components struct {
	BuildKit string `json:"buildkit"`
	Runc     string `json:"runc"`
	Go       string `json:"go"`
	QEMU     string `json:"qemu,omitempty"`
}

// KernelPath, InitramfsPath and RootfsPath are the absolute paths of the
// image files.
func (m Manifest) KernelPath() string    { return filepath.Join(m.Dir, m.Kernel.Name) }
func (m Manifest) InitramfsPath() string { return filepath.Join(m.Dir, m.Initramfs.Name) }
func (m Manifest) RootfsPath() string    { return filepath.Join(m.Dir, m.Rootfs.Name) }

// Load reads the manifest in dir and checks the image files are there with
// the recorded sizes. It does not re-hash them; use Verify for that.
func Load(dir string) (Manifest, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return Manifest{}, err
	}
	b, err := os.ReadFile(filepath.Join(abs, manifestName))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Manifest{}, fmt.Errorf("no builder image in %s (missing %s); build one with `kiln builder-image build`", abs, manifestName)
		}
		return Manifest{}, fmt.Errorf("read builder image manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("parse builder image manifest %s: %w", filepath.Join(abs, manifestName), err)
	}
	if m.FormatVersion != FormatVersion {
		return Manifest{}, fmt.Errorf("builder image in %s has format %d, this kiln needs %d; rebuild it with `kiln builder-image build`", abs, m.FormatVersion, FormatVersion)
	}
	m.Dir = abs
	for _, f := range []File{m.Kernel, m.Initramfs, m.Rootfs} {
		if f.Name == "" || strings.ContainsRune(f.Name, filepath.Separator) {
			return Manifest{}, fmt.Errorf("builder image manifest in %s names a bad file %q", abs, f.Name)
		}
		fi, err := os.Stat(filepath.Join(abs, f.Name))
		if err != nil {
			return Manifest{}, fmt.Errorf("builder image in %s is incomplete: %w; rebuild it", abs, err)
		}
		if fi.Size() != f.Size {
			return Manifest{}, fmt.Errorf("builder image file %s is %d bytes, manifest says %d; rebuild it", f.Name, fi.Size(), f.Size)
		}
	}
	return m, nil
}

// Verify re-hashes the image files and compares them with the manifest.
func (m Manifest) Verify() error {
	for _, f := range []File{m.Kernel, m.Initramfs, m.Rootfs} {
		sum, err := fileSHA256(filepath.Join(m.Dir, f.Name))
		if err != nil {
			return fmt.Errorf("verify builder image: %w", err)
		}
		if sum != f.SHA256 {
			return fmt.Errorf("builder image file %s has sha256 %s, manifest says %s; the image was modified, rebuild it", f.Name, sum, f.SHA256)
		}
	}
	if d := imageDigest(m.Kernel, m.Initramfs, m.Rootfs); d != m.Digest {
		return fmt.Errorf("builder image digest is %s, manifest says %s", d, m.Digest)
	}
	return nil
}

func imageDigest(files ...File) string {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s %s\n", f.Name, f.SHA256)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// Build assembles the builder image in opts.OutputDir from the kernel,
// modules and runc installed on the machine and kiln's own source, and
// returns its manifest. The same inputs give byte-identical files.
// Concurrent Builds into one directory are serialized.
func Build(ctx context.Context, opts Options) (Manifest, error) {
	start := time.Now()
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.OutputDir == "" {
		return Manifest{}, errors.New("builder image: output directory is empty")
	}
	out, err := filepath.Abs(opts.OutputDir)
	if err != nil {
		return Manifest{}, err
	}
	if opts.Runc == "" {
		opts.Runc = "/usr/sbin/runc"
	}
	if len(opts.Modules) == 0 {
		opts.Modules = DefaultModules
	}
	if opts.Emulators == nil {
		opts.Emulators = DefaultEmulators
	}
	if err := ensurePackages(ctx, opts, log); err != nil {
		return Manifest{}, err
	}
	mkfs, err := exec.LookPath("mkfs.erofs")
	if err != nil {
		return Manifest{}, errors.New("mkfs.erofs not found; install it with `apt-get install -y erofs-utils`")
	}
	version, err := findKernel("/boot", "/lib/modules", opts.KernelVersion)
	if err != nil {
		return Manifest{}, err
	}
	mods, builtin, err := resolveModules("/lib/modules", version, opts.Modules)
	if err != nil {
		return Manifest{}, err
	}

	if err := os.MkdirAll(out, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("create builder image directory: %w", err)
	}
	unlock, err := lockDir(ctx, out)
	if err != nil {
		return Manifest{}, err
	}
	defer unlock()
	// Under the lock no other build is running: whatever a crashed one
	// left behind can go.
	if stale, _ := filepath.Glob(filepath.Join(out, ".build-*")); len(stale) > 0 {
		for _, d := range stale {
			os.RemoveAll(d)
		}
	}

	work, err := os.MkdirTemp(out, ".build-")
	if err != nil {
		return Manifest{}, fmt.Errorf("create build directory: %w", err)
	}
	defer os.RemoveAll(work)

	bins, err := binaries(ctx, opts, work, log)
	if err != nil {
		return Manifest{}, err
	}

	// Stage both trees, then hash what would go into the image.
	ca := "/etc/ssl/certs/ca-certificates.crt"
	if _, err := os.Stat(ca); err != nil {
		ca = ""
	}
	layout, err := rootLayout(bins.agent, bins.buildkitd, opts.Runc, ca)
	if err != nil {
		return Manifest{}, err
	}
	emu, err := emulatorFiles(ctx, opts.Emulators)
	if err != nil {
		return Manifest{}, err
	}
	layout = append(layout, emu.files...)
	rootDir := filepath.Join(work, "root")
	if err := stageRoot(rootDir, layout); err != nil {
		return Manifest{}, fmt.Errorf("stage root filesystem: %w", err)
	}
	initEntries, err := initramfsEntries(bins.init, mods)
	if err != nil {
		return Manifest{}, err
	}
	var cpio bytes.Buffer
	if err := writeCpio(&cpio, initEntries); err != nil {
		return Manifest{}, err
	}
	inputs, err := inputsDigest(version, rootDir, cpio.Bytes(), mkfs)
	if err != nil {
		return Manifest{}, err
	}
	if m, err := Load(out); err == nil && m.InputsDigest == inputs {
		if err := m.Verify(); err == nil {
			log.Info("builder image up to date", "dir", out, "digest", m.Digest, "elapsed", time.Since(start).Round(time.Millisecond))
			return m, nil
		}
	}

	kernel, err := os.ReadFile(filepath.Join("/boot", "vmlinuz-"+version))
	if err != nil {
		return Manifest{}, fmt.Errorf("read kernel: %w", err)
	}
	vmlinux, err := extractVmlinux(kernel, version)
	if err != nil {
		return Manifest{}, fmt.Errorf("kernel %s: %w", version, err)
	}
	if err := ctx.Err(); err != nil {
		return Manifest{}, err
	}
	if err := os.WriteFile(filepath.Join(work, kernelName), vmlinux, 0o644); err != nil {
		return Manifest{}, fmt.Errorf("write vmlinux: %w", err)
	}
	if err := os.WriteFile(filepath.Join(work, initramfsName), cpio.Bytes(), 0o644); err != nil {
		return Manifest{}, fmt.Errorf("write initramfs: %w", err)
	}
	uuid, err := uuidFrom(strings.TrimPrefix(inputs, "sha256:"))
	if err != nil {
		return Manifest{}, err
	}
	if err := mkErofs(ctx, mkfs, rootDir, filepath.Join(work, rootfsName), uuid); err != nil {
		return Manifest{}, fmt.Errorf("build root filesystem: %w", err)
	}

	m := Manifest{
		FormatVersion:  FormatVersion,
		InputsDigest:   inputs,
		KernelVersion:  version,
		BuiltinModules: builtin,
		Cmdline:        []string{"kiln.root=" + RootSerial},
		RootSerial:     RootSerial,
		AgentPort:      AgentPort,
		Native:         nativePlatforms("/boot", version),
		Emulates:       emu.platforms,
		Components: Components{
			Runc: commandVersion(ctx, opts.Runc),
			Go:   goVersion(bins.agent),
			QEMU: emu.version,
		},
		Dir: out,
	}
	if v, err := moduleVersion(bins.buildkitd, "github.com/moby/buildkit"); err == nil {
		m.Components.BuildKit = v
	}
	for _, mod := range mods {
		m.Modules = append(m.Modules, mod.Name)
	}
	for _, f := range []struct {
		dst  *File
		name string
	}{{&m.Kernel, kernelName}, {&m.Initramfs, initramfsName}, {&m.Rootfs, rootfsName}} {
		p := filepath.Join(work, f.name)
		fi, err := os.Stat(p)
		if err != nil {
			return Manifest{}, err
		}
		sum, err := fileSHA256(p)
		if err != nil {
			return Manifest{}, err
		}
		*f.dst = File{Name: f.name, Size: fi.Size(), SHA256: sum}
	}
	m.Digest = imageDigest(m.Kernel, m.Initramfs, m.Rootfs)

	// Publish: image files first, the manifest last, so a crash leaves
	// either the old manifest (whose size check then fails) or a
	// complete new image.
	for _, name := range []string{kernelName, initramfsName, rootfsName} {
		if err := os.Rename(filepath.Join(work, name), filepath.Join(out, name)); err != nil {
			return Manifest{}, fmt.Errorf("publish %s: %w", name, err)
		}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return Manifest{}, err
	}
	tmp := filepath.Join(work, manifestName)
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return Manifest{}, fmt.Errorf("write manifest: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(out, manifestName)); err != nil {
		return Manifest{}, fmt.Errorf("publish manifest: %w", err)
	}
	log.Info("builder image built", "dir", out, "digest", m.Digest, "kernel", version,
		"vmlinux_bytes", m.Kernel.Size, "initramfs_bytes", m.Initramfs.Size, "rootfs_bytes", m.Rootfs.Size,
		"elapsed", time.Since(start).Round(time.Millisecond))
	return m, nil
}

type builtBinaries struct{ agent, init, buildkitd string }

// binaries returns static agent, init and buildkitd binaries: the
// prebuilt ones from opts, or fresh builds from the kiln source tree.
func binaries(ctx context.Context, opts Options, work string, log *slog.Logger) (builtBinaries, error) {
	b := builtBinaries{agent: opts.AgentBinary, init: opts.InitBinary, buildkitd: opts.BuildkitdBinary}
	need := b.agent == "" || b.init == "" || b.buildkitd == ""
	src := opts.SourceDir
	if need && src == "" {
		wd, err := os.Getwd()
		if err != nil {
			return b, err
		}
		if src, err = findSourceDir(wd); err != nil {
			return b, err
		}
	}
	var bkVersion []string
	if b.buildkitd == "" {
		// The tool directive in go.mod pins the version; stamp it so
		// buildkitd reports it like a release build does.
		v, err := goModuleVersion(ctx, src, "github.com/moby/buildkit")
		if err != nil {
			return b, err
		}
		bkVersion = []string{"-X", "github.com/moby/buildkit/version.Version=" + v}
	}
	for _, t := range []struct {
		dst     *string
		pkg     string
		ldflags []string
	}{
		{&b.agent, "./cmd/kiln-agent", nil},
		{&b.init, "./cmd/kiln-init", nil},
		{&b.buildkitd, "github.com/moby/buildkit/cmd/buildkitd", bkVersion},
	} {
		if *t.dst == "" {
			p := filepath.Join(work, "bin", filepath.Base(t.pkg))
			start := time.Now()
			if err := goBuild(ctx, src, t.pkg, p, t.ldflags...); err != nil {
				return b, err
			}
			log.Debug("built static binary", "package", t.pkg, "elapsed", time.Since(start).Round(time.Millisecond))
			*t.dst = p
		}
		if err := isStatic(*t.dst); err != nil {
			return b, fmt.Errorf("builder image needs static binaries: %w", err)
		}
	}
	return b, nil
}

// initramfsEntries lays out the initramfs: /init, the modules and their
// load order, and /dev/console so the kernel can give init a console
// before devtmpfs is mounted.
func initramfsEntries(initBin string, mods []module) ([]cpioEntry, error) {
	initData, err := os.ReadFile(initBin)
	if err != nil {
		return nil, fmt.Errorf("read init binary: %w", err)
	}
	entries := []cpioEntry{
		{Path: "dev", Mode: fs.ModeDir | 0o755},
		{Path: "dev/console", Mode: fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Path: "proc", Mode: fs.ModeDir | 0o755},
		{Path: "sys", Mode: fs.ModeDir | 0o755},
		{Path: "init", Mode: 0o755, Data: initData},
		{Path: "kiln", Mode: fs.ModeDir | 0o755},
		{Path: "kiln/modules", Mode: fs.ModeDir | 0o755},
	}
	var order strings.Builder
	for _, m := range mods {
		data, err := readModule(m.Path)
		if err != nil {
			return nil, err
		}
		name := m.Name + ".ko"
		entries = append(entries, cpioEntry{Path: "kiln/modules/" + name, Mode: 0o644, Data: data})
		order.WriteString(name + "\n")
	}
	entries = append(entries, cpioEntry{Path: "kiln/modules.order", Mode: 0o644, Data: []byte(order.String())})
	return entries, nil
}

// inputsDigest covers everything the three image files are made of: the
// kernel, the exact initramfs bytes, the staged root tree and the
// mkfs.erofs that will write it.
func inputsDigest(version, rootDir string, cpio []byte, mkfs string) (string, error) {
	kernelSum, err := fileSHA256(filepath.Join("/boot", "vmlinuz-"+version))
	if err != nil {
		return "", fmt.Errorf("hash kernel: %w", err)
	}
	mkfsSum, err := fileSHA256(mkfs)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", mkfs, err)
	}
	tree, err := treeDigest(rootDir)
	if err != nil {
		return "", err
	}
	cpioSum := sha256.Sum256(cpio)
	h := sha256.New()
	fmt.Fprintf(h, "format %d\nkernel %s %s\ninitramfs %x\nroot %s\nmkfs.erofs %s\n",
		FormatVersion, version, kernelSum, cpioSum, tree, mkfsSum)
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// lockDir takes an exclusive flock on dir/.lock, waiting until ctx ends.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock builder image directory: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock builder image directory: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for another build of the builder image in %s: %w", dir, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ensurePackages installs missing Debian packages when allowed, and
// otherwise says which command would.
func ensurePackages(ctx context.Context, opts Options, log *slog.Logger) error {
	var missing []string
	if paths, _ := filepath.Glob("/boot/vmlinuz-*"); len(paths) == 0 {
		missing = append(missing, "linux-image-amd64")
	}
	if _, err := exec.LookPath("mkfs.erofs"); err != nil {
		missing = append(missing, "erofs-utils")
	}
	if _, err := os.Stat(opts.Runc); err != nil && opts.Runc == "/usr/sbin/runc" {
		missing = append(missing, "runc")
	}
	for _, name := range opts.Emulators {
		if _, err := os.Stat(emulatorPath(name)); err != nil {
			missing = append(missing, qemuUserStatic)
			break
		}
	}
	if len(missing) == 0 {
		return nil
	}
	install := "apt-get install -y " + strings.Join(missing, " ")
	if !opts.InstallPackages {
		return fmt.Errorf("builder image needs Debian packages %s; install them with `%s`", strings.Join(missing, ", "), install)
	}
	log.Info("installing packages for the builder image", "packages", missing)
	for _, args := range [][]string{{"update", "-q"}, append([]string{"install", "-y", "-q"}, missing...)} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %w\n%s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
