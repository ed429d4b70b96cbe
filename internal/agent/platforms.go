package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
)

// nativePlatforms run in the builder VM without emulation: its own, and
// 32-bit x86, which the x86-64 kernel runs itself.
var nativePlatforms = []string{"linux/amd64", "linux/386"}

// checkEmulation refuses a job for a foreign platform when /init could
// not register the builder's emulators (kiln-init writes what failed to
// errFile). Without the check BuildKit would still run the job, and its
// first RUN step of that platform would fail with "exec format error".
func checkEmulation(errFile string, platforms []string) error {
	if errFile == "" {
		return nil
	}
	var foreign []string
	for _, p := range platforms {
		if !slices.Contains(nativePlatforms, p) {
			foreign = append(foreign, p)
		}
	}
	if len(foreign) == 0 {
		return nil
	}
	b, err := os.ReadFile(errFile)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(strings.TrimSpace(string(b))) == 0) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check the builder's emulators for %s: %w", strings.Join(foreign, ", "), err)
	}
	return fmt.Errorf("this builder VM cannot emulate %s: registering its QEMU emulators with binfmt_misc failed at boot:\n%s\nrebuild the builder image with `kiln builder-image build`, or build for linux/amd64 only",
		strings.Join(foreign, ", "), strings.TrimSpace(string(b)))
}
