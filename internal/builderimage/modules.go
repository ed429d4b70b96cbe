package builderimage

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// DefaultModules are the modules the Debian 6.1 kernel needs in the
// builder VM, in load order: virtio over MMIO (microvm has no PCI), block
// and console, the erofs root, ext4 for the cache volume (crc32c_generic
// first: mke2fs enables metadata_csum), overlayfs for BuildKit's
// snapshotter, virtio_net for an optional network, and binfmt_misc for
// the QEMU user-mode emulators of foreign platforms.
var DefaultModules = []string{
	"virtio_ring", "virtio", "virtio_mmio", "virtio_blk",
	"crc16", "mbcache", "jbd2", "crc32c_generic", "ext4",
	"libcrc32c", "erofs", "overlay",
	"failover", "net_failover", "virtio_net", "virtio_console",
	"binfmt_misc",
}

// module is one kernel module to ship in the initramfs.
type module struct {
	Name string // canonical name (underscores), e.g. "virtio_blk"
	Path string // absolute path on the host, possibly compressed
}

// resolveModules maps names to files through modules.dep, skips modules
// built into the kernel, and checks every dependency is loaded earlier in
// the list, so init's plain in-order finit_module calls succeed.
func resolveModules(modulesDir, version string, names []string) ([]module, []string, error) {
	root := filepath.Join(modulesDir, version)
	deps, err := readModulesDep(filepath.Join(root, "modules.dep"))
	if err != nil {
		return nil, nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(root, "modules.builtin")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if l != "" {
				builtin[moduleName(l)] = true
			}
		}
	}
	loaded := map[string]bool{}
	var mods []module
	var skipped []string
	for _, raw := range names {
		name := canonicalModule(raw)
		if builtin[name] {
			skipped = append(skipped, name)
			loaded[name] = true
			continue
		}
		d, ok := deps[name]
		if !ok {
			return nil, nil, fmt.Errorf("kernel %s has no module %q (not in modules.dep, not built in); remove it from the module list", version, raw)
		}
		for _, dep := range d.deps {
			if !loaded[dep] {
				return nil, nil, fmt.Errorf("module %s needs %s, which is not loaded before it; add %s earlier in the module list", name, dep, dep)
			}
		}
		loaded[name] = true
		mods = append(mods, module{Name: name, Path: filepath.Join(root, d.path)})
	}
	return mods, skipped, nil
}

type depEntry struct {
	path string
	deps []string
}

func readModulesDep(path string) (map[string]depEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read kernel module index: %w; reinstall the kernel package", err)
	}
	defer f.Close()
	out := map[string]depEntry{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var deps []string
		for _, d := range strings.Fields(rest) {
			deps = append(deps, moduleName(d))
		}
		out[moduleName(mod)] = depEntry{path: mod, deps: deps}
	}
	return out, sc.Err()
}

// moduleName turns "kernel/fs/ext4/ext4.ko.xz" into "ext4".
func moduleName(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return canonicalModule(base)
}

// canonicalModule folds dashes to underscores, as the kernel does.
func canonicalModule(name string) string { return strings.ReplaceAll(name, "-", "_") }

// readModule returns a module's ELF bytes. finit_module takes compressed
// modules only on kernels built with MODULE_DECOMPRESS; unpacking here
// works on every kernel.
func readModule(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read module: %w", err)
	}
	var r io.Reader
	switch {
	case strings.HasSuffix(path, ".ko"):
		return b, nil
	case strings.HasSuffix(path, ".ko.xz"):
		r, err = xz.NewReader(bytes.NewReader(b))
	case strings.HasSuffix(path, ".ko.zst"):
		var d *zstd.Decoder
		d, err = zstd.NewReader(bytes.NewReader(b))
		if err == nil {
			defer d.Close()
			r = d
		}
	case strings.HasSuffix(path, ".ko.gz"):
		r, err = gzip.NewReader(bytes.NewReader(b))
	default:
		return nil, fmt.Errorf("module %s has an unknown file type", path)
	}
	if err != nil {
		return nil, fmt.Errorf("decompress module %s: %w", path, err)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("decompress module %s: %w", path, err)
	}
	return out, nil
}
