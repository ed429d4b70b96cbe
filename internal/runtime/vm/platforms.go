package vm

import (
	"slices"
	"strings"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/runtime"
)

var _ runtime.PlatformChecker = (*Runtime)(nil)

// imagePlatforms are what builds on m may target: what the builder image
// runs natively (linux/amd64, and linux/386 when its kernel runs 32-bit
// x86) and what its QEMU user-mode emulators run (registered with
// binfmt_misc in the guest), sorted.
func imagePlatforms(m builderimage.Manifest) []string {
	all := append([]string{builderimage.HostPlatform}, m.Native...)
	all = append(all, m.Emulates...)
	slices.Sort(all)
	return slices.Compact(all)
}

// CheckPlatforms refuses, at submission, a build for a platform the
// builder image can neither run nor emulate. platforms are normalized
// (linux/arm/v7); an image built before emulation existed has only
// linux/amd64 and says how to get more.
func (r *Runtime) CheckPlatforms(platforms []string) error {
	return checkImagePlatforms(r.cfg.Image, platforms)
}

func checkImagePlatforms(m builderimage.Manifest, platforms []string) error {
	can := imagePlatforms(m)
	for _, p := range platforms {
		if slices.Contains(can, p) {
			continue
		}
		hint := ""
		if len(m.Emulates) == 0 {
			hint = "; its builder image emulates no foreign platform: rebuild it with `kiln builder-image build` on a host with qemu-user-static installed"
		}
		return errdefs.Invalid("platform %s cannot be built here: this server (vm runtime) builds %s%s",
			errdefs.Quote(p), strings.Join(can, ", "), hint)
	}
	return nil
}
