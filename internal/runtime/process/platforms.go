package process

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strings"
	"sync"

	"github.com/kiln-build/kiln/internal/binfmt"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/runtime"
)

// Platforms: build steps run on the host's kernel, so a build targets the
// host's platform, 32-bit x86 on an x86-64 kernel that runs it, and a
// foreign platform only when the host has an enabled binfmt_misc handler
// for its ELF executables: the one buildkitd finds when it probes at
// start. The handler must be registered with the F (fix-binary) flag: the
// kernel then opens the interpreter at registration; without F it looks
// the interpreter up by path inside the build container, where it is not.

var _ runtime.PlatformChecker = (*Runtime)(nil)

// binfmtDir is where the kernel shows binfmt_misc handlers.
const binfmtDir = "/proc/sys/fs/binfmt_misc"

// CheckPlatforms refuses, at submission, a build for a platform this host
// can neither run nor emulate. platforms are normalized (linux/arm/v7).
func (r *Runtime) CheckPlatforms(platforms []string) error {
	return checkPlatforms(binfmtDir, nativePlatforms(), platforms)
}

// nativePlatforms is what the host kernel runs itself.
func nativePlatforms() []string {
	native := []string{"linux/" + goruntime.GOARCH}
	if goruntime.GOARCH == "amd64" && runs386() == nil {
		native = append(native, "linux/386")
	}
	return native
}

// checkPlatforms checks platforms against native and the handlers in dir
// (a binfmt_misc mount).
func checkPlatforms(dir string, native, platforms []string) error {
	var foreign []string
	for _, p := range platforms {
		if !slices.Contains(native, p) {
			foreign = append(foreign, p)
		}
	}
	if len(foreign) == 0 {
		return nil
	}
	handlers, scanErr := binfmtHandlers(dir)
	can := slices.Clone(native)
	for _, h := range handlers {
		if h.usable() {
			can = append(can, h.platforms...)
		}
	}
	slices.Sort(can)
	can = slices.Compact(can)
	for _, p := range foreign {
		if slices.Contains(can, p) {
			continue
		}
		why := "the host has no enabled binfmt_misc handler for its executables"
		if scanErr != nil {
			why = scanErr.Error()
		}
		for _, h := range handlers {
			if !slices.Contains(h.platforms, p) {
				continue
			}
			switch {
			case !h.enabled:
				why = fmt.Sprintf("the host's binfmt_misc handler %s for it is disabled", h.name)
			case !strings.Contains(h.flags, "F"):
				why = fmt.Sprintf("the host's binfmt_misc handler %s for it lacks the F (fix-binary) flag, so its interpreter %s is not found inside build containers; register it again with flags including F", h.name, h.interpreter)
			}
		}
		return errdefs.Invalid("platform %s cannot be built by this server's process runtime, which builds %s: %s. "+
			"Install qemu-user-static on the host and register its handlers with binfmt_misc (its package does so where systemd runs; else write each /usr/lib/binfmt.d/qemu-*.conf line to %s/register), or use the vm runtime, whose builder emulates foreign platforms itself",
			errdefs.Quote(p), strings.Join(can, ", "), why, dir)
	}
	return nil
}

// binfmtHandler is one entry of a binfmt_misc mount.
type binfmtHandler struct {
	name        string
	enabled     bool
	interpreter string
	flags       string
	// platforms are those whose executables the handler's magic matches.
	platforms []string
}

func (h binfmtHandler) usable() bool {
	return h.enabled && strings.Contains(h.flags, "F") && len(h.platforms) > 0
}

// binfmtHandlers reads every handler in dir. A disabled binfmt_misc
// (status "disabled") disables them all.
func binfmtHandlers(dir string) ([]binfmtHandler, error) {
	status, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("binfmt_misc is not mounted on %s (mount it with `mount -t binfmt_misc binfmt_misc %s`)", dir, dir)
		}
		return nil, fmt.Errorf("read binfmt_misc status: %w", err)
	}
	allOn := strings.TrimSpace(string(status)) == "enabled"
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list binfmt_misc handlers: %w", err)
	}
	var out []binfmtHandler
	for _, e := range entries {
		if e.Name() == "status" || e.Name() == "register" || e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // removed meanwhile
		}
		h := parseBinfmt(e.Name(), string(b))
		h.enabled = h.enabled && allOn
		out = append(out, h)
	}
	return out, nil
}

// parseBinfmt reads a handler file as the kernel writes it:
//
//	enabled
//	interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
//	flags: POF
//	offset 0
//	magic 7f454c460201010000000000000000000200b700
//	mask ffffffffffffff00fffffffffffffffffeffffff
//
// Only magic handlers at offset 0 that match ELF executables get
// platforms: matching by the ELF machine, not the handler's name, finds a
// handler whatever registered it (qemu-user-static, binfmt-support,
// tonistiigi/binfmt's buildkit-qemu-*).
func parseBinfmt(name, s string) binfmtHandler {
	h := binfmtHandler{name: name}
	var magic, mask []byte
	offset := "0"
	for _, line := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		switch k {
		case "enabled":
			h.enabled = true
		case "interpreter":
			h.interpreter = v
		case "flags:":
			h.flags = v
		case "offset":
			offset = v
		case "magic":
			magic, _ = hex.DecodeString(v)
		case "mask":
			mask, _ = hex.DecodeString(v)
		}
	}
	if offset != "0" {
		return h
	}
	h.platforms = binfmt.ELFPlatforms(magic, mask)
	return h
}

// runs386 reports whether the host kernel runs 32-bit x86 executables
// itself (IA32 emulation: built into Debian's x86-64 kernels, but a
// kernel may lack it or boot with ia32_emulation=0), by running one, as
// buildkitd's own probe does. Asked once per process.
var runs386 = sync.OnceValue(func() error {
	dir, err := os.MkdirTemp("", "kiln-386-probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "exit42")
	if err := os.WriteFile(p, exit42ELF386(), 0o700); err != nil {
		return err
	}
	err = exec.Command(p).Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 42 {
		return nil
	}
	return fmt.Errorf("a 32-bit x86 executable did not run: %v", err)
})

// exit42ELF386 is the smallest i386 executable: one PT_LOAD segment whose
// code is exit(42) through int 0x80.
func exit42ELF386() []byte {
	const base, ehsize, phsize = 0x08048000, 52, 32
	code := []byte{
		0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (exit)
		0xbb, 0x2a, 0x00, 0x00, 0x00, // mov ebx, 42
		0xcd, 0x80, // int 0x80
	}
	size := uint32(ehsize + phsize + len(code))
	var b bytes.Buffer
	b.Write([]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS32), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)})
	b.Write(make([]byte, 9))
	w := func(v any) { _ = binary.Write(&b, binary.LittleEndian, v) }
	w(uint16(elf.ET_EXEC))
	w(uint16(elf.EM_386))
	w(uint32(elf.EV_CURRENT))
	w(uint32(base + ehsize + phsize)) // e_entry
	w(uint32(ehsize))                 // e_phoff
	w(uint32(0))                      // e_shoff
	w(uint32(0))                      // e_flags
	w(uint16(ehsize))
	w(uint16(phsize))
	w(uint16(1)) // e_phnum
	w(uint16(0)) // e_shentsize
	w(uint16(0)) // e_shnum
	w(uint16(0)) // e_shstrndx
	w(uint32(elf.PT_LOAD))
	w(uint32(0))    // p_offset
	w(uint32(base)) // p_vaddr
	w(uint32(base)) // p_paddr
	w(size)         // p_filesz
	w(size)         // p_memsz
	w(uint32(elf.PF_R | elf.PF_X))
	w(uint32(0x1000)) // p_align
	b.Write(code)
	return b.Bytes()
}
