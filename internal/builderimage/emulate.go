package builderimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/kiln-build/kiln/internal/binfmt"
)

// Foreign platforms: the image carries QEMU user-mode emulators from
// Debian's qemu-user-static (statically linked, so they run inside build
// containers that have no libraries of their own) and one binfmt_misc
// registration line per emulator. /init registers them with the F flag:
// the kernel opens the interpreter at registration and uses that open file
// for every later exec, in whatever mount namespace it happens, so RUN
// steps of a foreign image (whose root has no /usr/bin/qemu-*) run too.
// buildkitd probes binfmt_misc when it starts and then reports the
// emulated platforms as its worker's own.

// DefaultEmulators are the QEMU user-mode targets the image emulates: the
// platforms images are commonly published for besides linux/amd64. Each
// is about 11 MB.
var DefaultEmulators = []string{"aarch64", "arm", "riscv64", "ppc64le", "s390x"}

// HostPlatform is the platform the builder VM runs natively.
const HostPlatform = "linux/amd64"

const (
	// BinfmtDir holds the image's binfmt_misc registration lines, one
	// file per emulator, each a line for /proc/sys/fs/binfmt_misc/register.
	BinfmtDir = "/usr/lib/binfmt.d"
	// BinfmtFlags are the flags every emulator is registered with. F: the
	// interpreter is opened at registration and works inside containers.
	// P: argv[0] is passed on (busybox applets and login shells depend
	// on it; QEMU reads the flag from AT_FLAGS). C: setuid binaries get
	// their owner's credentials, as natively (implies O: the binary is
	// handed to QEMU as an open file, so execute-only binaries run).
	// Debian registers OPF, tonistiigi/binfmt CF.
	BinfmtFlags = "POCF"

	hostQEMUDir    = "/usr/bin"
	hostBinfmtDir  = "/usr/lib/binfmt.d"
	qemuUserStatic = "qemu-user-static"
)

// qemuTargets are the emulators kiln knows, each with the OCI platforms
// BuildKit builds with it.
var qemuTargets = map[string][]string{
	"aarch64": {"linux/arm64"},
	// One 32-bit ARM emulator runs both variants BuildKit knows.
	"arm":     {"linux/arm/v6", "linux/arm/v7"},
	"riscv64": {"linux/riscv64"},
	"ppc64le": {"linux/ppc64le"},
	"s390x":   {"linux/s390x"},
}

// emulatorPath is where emulator name lives, on the host and in the image.
func emulatorPath(name string) string {
	return filepath.Join(hostQEMUDir, "qemu-"+name+"-static")
}

// emulation is what emulatorFiles adds to the image.
type emulation struct {
	files     []rootFile
	platforms []string // sorted, each once
	version   string   // of the first emulator, for the manifest
}

// emulatorFiles returns the emulators' binaries and registration lines
// for the root filesystem, and the platforms they add. The lines are
// Debian's (the same magic and mask as the host's qemu-user-static
// registers) with the interpreter path in the image and BinfmtFlags.
func emulatorFiles(ctx context.Context, names []string) (emulation, error) {
	var e emulation
	for _, name := range names {
		platforms, ok := qemuTargets[name]
		if !ok {
			known := make([]string, 0, len(qemuTargets))
			for k := range qemuTargets {
				known = append(known, k)
			}
			slices.Sort(known)
			return emulation{}, fmt.Errorf("builder image: no emulator %q; kiln knows %s", name, strings.Join(known, ", "))
		}
		bin := emulatorPath(name)
		if err := isStatic(bin); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return emulation{}, fmt.Errorf("builder image: emulator %s is missing; install it with `apt-get install -y %s`", bin, qemuUserStatic)
			}
			return emulation{}, fmt.Errorf("builder image: emulator %s must be static (Debian's %s): %w", bin, qemuUserStatic, err)
		}
		conf := filepath.Join(hostBinfmtDir, "qemu-"+name+".conf")
		line, err := readBinfmtLine(conf)
		if err != nil {
			return emulation{}, fmt.Errorf("builder image: %w; reinstall %s", err, qemuUserStatic)
		}
		reg, err := rewriteBinfmt(line, "qemu-"+name, bin, platforms)
		if err != nil {
			return emulation{}, fmt.Errorf("builder image: %s: %w", conf, err)
		}
		e.files = append(e.files,
			rootFile{Path: bin, Mode: 0o755, Source: bin},
			rootFile{Path: filepath.Join(BinfmtDir, "qemu-"+name+".conf"), Mode: 0o644, Data: []byte(reg + "\n")},
		)
		e.platforms = append(e.platforms, platforms...)
		if e.version == "" {
			e.version = commandVersion(ctx, bin)
		}
	}
	slices.Sort(e.platforms)
	e.platforms = slices.Compact(e.platforms)
	return e, nil
}

// readBinfmtLine returns the one registration line of a binfmt.d file
// (comments and blank lines skipped).
func readBinfmtLine(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read binfmt_misc registration: %w", err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l != "" && !strings.HasPrefix(l, "#") && !strings.HasPrefix(l, ";") {
			lines = append(lines, l)
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if len(lines) != 1 {
		return "", fmt.Errorf("%s has %d registration lines, want 1", path, len(lines))
	}
	return lines[0], nil
}

// rewriteBinfmt checks a magic-type registration line
// (:name:M:offset:magic:mask:interpreter:flags) matches target t and
// replaces its interpreter and flags.
func rewriteBinfmt(line, name, interp string, platforms []string) (string, error) {
	// The magic and mask are \x-escaped, so ':' only separates fields.
	f := strings.Split(line, ":")
	if len(f) != 8 || f[0] != "" {
		return "", fmt.Errorf("registration %q is not :name:type:offset:magic:mask:interpreter:flags", line)
	}
	if f[1] != name || f[2] != "M" || (f[3] != "" && f[3] != "0") {
		return "", fmt.Errorf("registration %q: want a magic (M) entry named %s at offset 0", line, name)
	}
	magic, err := unescapeBinfmt(f[4])
	if err != nil {
		return "", fmt.Errorf("magic: %w", err)
	}
	if got := binfmt.ELFPlatforms(magic, nil); !slices.Equal(got, platforms) {
		return "", fmt.Errorf("registration %s matches ELF executables of %v, not of %s", name, got, strings.Join(platforms, ", "))
	}
	f[6], f[7] = interp, BinfmtFlags
	return strings.Join(f, ":"), nil
}

// unescapeBinfmt decodes binfmt_misc's \xHH escapes.
func unescapeBinfmt(s string) ([]byte, error) {
	var out []byte
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			out = append(out, s[i])
			continue
		}
		if i+4 > len(s) || s[i+1] != 'x' {
			return nil, fmt.Errorf("bad escape at %d in %q", i, s)
		}
		b, err := strconv.ParseUint(s[i+2:i+4], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("bad escape at %d in %q", i, s)
		}
		out = append(out, byte(b))
		i += 3
	}
	return out, nil
}

// nativePlatforms is what the guest kernel runs without emulation: amd64,
// and 386 when the kernel runs 32-bit x86 binaries (IA32 emulation, on in
// Debian's kernel) by default.
func nativePlatforms(bootDir, version string) []string {
	native := []string{HostPlatform}
	b, err := os.ReadFile(filepath.Join(bootDir, "config-"+version))
	if err != nil {
		return native
	}
	cfg := "\n" + string(b)
	if strings.Contains(cfg, "\nCONFIG_IA32_EMULATION=y\n") && !strings.Contains(cfg, "\nCONFIG_IA32_EMULATION_DEFAULT_DISABLED=y\n") {
		native = append(native, "linux/386")
	}
	return native
}
