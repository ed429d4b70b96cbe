package vm

import (
	"errors"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/errdefs"
)

// TestCheckPlatformsFollowsTheImage: the vm runtime builds its own
// platform always, and a foreign one only when the builder image's
// manifest says it emulates it; anything else is invalid input, named,
// with what the server can build.
func TestCheckPlatformsFollowsTheImage(t *testing.T) {
	m := builderimage.Manifest{
		Native:   []string{"linux/amd64", "linux/386"},
		Emulates: []string{"linux/arm/v6", "linux/arm/v7", "linux/arm64", "linux/ppc64le", "linux/riscv64", "linux/s390x"},
	}
	for _, ok := range [][]string{nil, {"linux/amd64"}, {"linux/amd64", "linux/arm64"}, {"linux/arm/v7", "linux/386", "linux/s390x"}} {
		if err := checkImagePlatforms(m, ok); err != nil {
			t.Errorf("%v: %v", ok, err)
		}
	}
	err := checkImagePlatforms(m, []string{"linux/arm64", "linux/mips64le"})
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("linux/mips64le: %v, want an invalid-request error", err)
	}
	for _, want := range []string{`"linux/mips64le"`, "linux/amd64, linux/arm/v6", "linux/arm64", "linux/s390x"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}

	// An image without emulators (or from before them) builds its own
	// platform and says how to get more.
	old := builderimage.Manifest{}
	if err := checkImagePlatforms(old, []string{"linux/amd64"}); err != nil {
		t.Fatalf("own platform on an image without emulators: %v", err)
	}
	err = checkImagePlatforms(old, []string{"linux/arm64"})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "qemu-user-static") || !strings.Contains(err.Error(), "builds linux/amd64;") {
		t.Fatalf("arm64 on an image without emulators: %v", err)
	}
}
