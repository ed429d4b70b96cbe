package images

import (
	"context"
	"fmt"
	"io"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/runner"
)

// ErrNoBuilderImage means kiln has no builder VM image to boot images with.
var ErrNoBuilderImage = errdefs.Sentinel(errdefs.ErrUnavailable, "no builder image")

// RunSpec is what a caller may choose about one run of an image.
type RunSpec struct {
	Args     []string // replace the image's Cmd
	Env      []string // KEY=VALUE, added to the image's
	MemoryMB int
	CPUs     int
}

// SetBuilderDir tells the service where the builder image lives; it is
// loaded at each run, so one built after the server started is used.
func (s *Service) SetBuilderDir(dir string) { s.builderDir = dir }

// Run boots name's converted root filesystem in a microVM (converting the
// digest first if that has not happened yet), runs the image's entrypoint
// and cmd, streams its output and returns its exit code.
func (s *Service) Run(ctx context.Context, pr auth.Principal, name string, spec RunSpec, stdout, stderr io.Writer) (int, error) {
	im, err := s.Get(ctx, pr, name)
	if err != nil {
		return -1, err
	}
	if s.builderDir == "" {
		return -1, fmt.Errorf("%w: this server has no builder image directory configured", ErrNoBuilderImage)
	}
	m, err := builderimage.Load(s.builderDir)
	if err != nil {
		return -1, fmt.Errorf("%w: %v (run kiln builder-image build on the server)", ErrNoBuilderImage, err)
	}
	art, err := s.conv.Ensure(ctx, im.Digest)
	if err != nil {
		return -1, fmt.Errorf("convert %s to a bootable filesystem: %w", im.Name, err)
	}
	return runner.Run(ctx, runner.Spec{Image: m, RootFS: art.RootFS(), Config: art.Config, Args: spec.Args,
		Env: spec.Env, MemoryMiB: spec.MemoryMB, CPUs: spec.CPUs, Logger: s.log}, stdout, stderr)
}
