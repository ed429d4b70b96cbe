// Package runtime runs one build's BuildKit solve somewhere isolated. The
// process runtime starts buildkitd on the host; the vm runtime boots a
// microVM per build. Everything above this package sees only Runtime.
package runtime

import (
	"context"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// Job is one build handed to a runtime.
type Job struct {
	BuildID string
	Solve   solve.Request

	// Volume is the path of the ext4 image that becomes buildkitd's root
	// (/var/lib/buildkit). It is the scope's persistent cache volume or a
	// scratch one; the runtime attaches it and must leave it unmounted
	// and clean when Run returns.
	Volume string
	// GC bounds BuildKit's garbage collection to the volume.
	GC GCPolicy

	// InsecureRegistries are hosts reached over plain HTTP (kiln's own
	// embedded registry on loopback).
	InsecureRegistries []string

	CPUs     int
	MemoryMB int
	// Network is egress or isolated; AllowedDomains, with egress, limits
	// RUN steps to those domains. Runtimes that cannot enforce a mode must
	// refuse the job rather than run it with more access.
	Network        string
	AllowedDomains []string
}

// GCPolicy holds quoted BuildKit size strings ("18GB", "2GiB"); a bare
// integer means bytes.
type GCPolicy struct {
	ReservedSpace string
	MaxUsedSpace  string
	MinFreeSpace  string
}

// Runtime runs jobs. Run blocks until the solve finished, failed or ctx
// was canceled; on cancel it must stop all work (solve, buildkitd, VM)
// before returning.
type Runtime interface {
	Name() string
	Run(ctx context.Context, job Job, sink progress.Sink) (solve.Result, error)
}

// NetworkChecker is implemented by runtimes that cannot enforce every
// network mode. Builds are checked against it at submission, so a build
// the runtime would refuse is refused before it is queued.
type NetworkChecker interface {
	CheckNetwork(mode string, allowedDomains []string) error
}
