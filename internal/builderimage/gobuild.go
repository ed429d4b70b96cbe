package builderimage

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// kilnModule is the module whose source holds cmd/kiln-agent and
// cmd/kiln-init.
const kilnModule = "github.com/kiln-build/kiln"

// goBuild builds one package as a static linux/amd64 binary. -trimpath,
// no VCS stamping and an empty build ID make the output a function of the
// source and toolchain alone, which the reproducibility promise needs.
func goBuild(ctx context.Context, srcDir, pkg, out string, ldflags ...string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags="+strings.Join(append([]string{"-s", "-w", "-buildid="}, ldflags...), " "), "-o", out, pkg)
	cmd.Dir = srcDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("go build %s: the go command is not installed; install Go, or pass prebuilt static binaries in Options", pkg)
		}
		return fmt.Errorf("go build %s (in %s): %w\n%s", pkg, srcDir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// findSourceDir walks up from dir to the go.mod of the kiln module.
func findSourceDir(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if isKilnModule(filepath.Join(d, "go.mod")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no %s source tree above %s; set Options.SourceDir, or pass prebuilt static binaries", kilnModule, dir)
		}
	}
}

func isKilnModule(gomod string) bool {
	f, err := os.Open(gomod)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) == 2 && fields[0] == "module" {
			return fields[1] == kilnModule
		}
	}
	return false
}

// moduleVersion reads the version of module mod linked into a Go binary.
func moduleVersion(bin, mod string) (string, error) {
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return "", fmt.Errorf("read Go build info of %s: %w", bin, err)
	}
	if bi.Main.Path == mod {
		return bi.Main.Version, nil
	}
	for _, d := range bi.Deps {
		if d.Path == mod {
			if d.Replace != nil {
				return d.Replace.Version, nil
			}
			return d.Version, nil
		}
	}
	return "", errors.New(bin + " does not contain " + mod)
}

func goVersion(bin string) string {
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return ""
	}
	return bi.GoVersion
}

// commandVersion returns the first line of `bin --version`, for the
// manifest only.
func commandVersion(ctx context.Context, bin string) string {
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}

// goModuleVersion asks the go command which version of mod the source
// tree pins.
func goModuleVersion(ctx context.Context, srcDir, mod string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", mod)
	cmd.Dir = srcDir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s (in %s): %w", mod, srcDir, err)
	}
	return strings.TrimSpace(string(out)), nil
}
