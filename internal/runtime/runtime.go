// Package runtime runs one build's BuildKit solve somewhere isolated. The
// process runtime starts buildkitd on the host; the vm runtime boots a
// microVM per build. Everything above this package sees only Runtime.
package runtime

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"

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

	// Registry is kiln's own registry (host:port): bases, build results
	// and kiln's caches live there. Every other registry host the job
	// names (a push with --push, a registry cache, a docker-image://
	// context) is external: the builder reaches it directly, with the
	// job's RegistryAuth, as the build's network policy allowed at
	// submission.
	Registry string
	// InsecureRegistries are hosts reached over plain HTTP (kiln's own
	// embedded registry on loopback, and those the operator listed in
	// registries.insecure).
	InsecureRegistries []string
	// AllowedRegistries is registries.allowed as the operator set it. A
	// runtime that dials external registries for the builder (vm) dials
	// those an entry names itself (egress.Listed) as they resolve, and
	// those only a wildcard allowed at public internet addresses only
	// (egress.PublicOnly), so a name that resolves into the server's own
	// networks reaches nothing there.
	AllowedRegistries []string

	CPUs     int
	MemoryMB int
	// Network is egress or isolated; AllowedDomains, with egress, limits
	// RUN steps to those domains. Runtimes that cannot enforce a mode must
	// refuse the job rather than run it with more access.
	Network        string
	AllowedDomains []string
	// Entitlements are the insecure entitlements the build's steps may
	// use (network.host, security.insecure), as the operator allowed.
	Entitlements []string
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

// PlatformChecker is implemented by runtimes that build only some
// platforms: their own and those they can emulate. Builds are checked
// against it at submission, like NetworkChecker. platforms are
// normalized os/arch[/variant] strings (linux/arm64, linux/arm/v7).
type PlatformChecker interface {
	CheckPlatforms(platforms []string) error
}

// Keeper is implemented by runtimes that can keep a builder running
// between builds (internal/builders pools them per cache scope). A builder
// is started with the shape of its first job and takes later jobs of the
// same shape (ShapeOf) and volume; nothing but the volume's contents
// crosses from one job to the next: secrets, registry credentials, the
// context and every network connection are per job.
type Keeper interface {
	StartBuilder(ctx context.Context, job Job, sink progress.Sink) (Builder, error)
}

// Builder is one running builder: buildkitd (process runtime) or a VM with
// kiln-agent and buildkitd (vm runtime), on one attached volume.
type Builder interface {
	// Run runs one job, which must have the builder's shape and volume.
	// It returns as Runtime.Run does; on cancel the solve is stopped.
	Run(ctx context.Context, job Job, sink progress.Sink) (solve.Result, error)
	// Reusable reports whether the builder may take another job: its
	// last Run ended with a result or a build failure, and nothing about
	// it is in doubt (no cancel or timeout that did not finish cleanly,
	// no exited buildkitd, no unresponsive agent).
	Reusable() bool
	// Stop ends the builder and detaches its volume, unmounted and
	// clean. It is safe to call more than once and after a failed Run.
	Stop(ctx context.Context) error
	// MemoryMB is what the builder holds while it is up (its VM's memory,
	// or the job's memory limit for buildkitd on the host).
	MemoryMB() int
}

// ShapeOf is what a builder is started with and must match for reuse:
// volume, resources, network policy, GC bounds and the registries the
// builder was set up to reach.
func ShapeOf(job Job) string {
	allowed := slices.Clone(job.AllowedDomains)
	slices.Sort(allowed)
	registries := slices.Clone(job.InsecureRegistries)
	for _, ref := range append(append(slices.Clone(job.Solve.Push), job.Solve.CacheImports...), job.Solve.CacheExport) {
		registries = append(registries, registryHost(ref))
	}
	for _, src := range job.Solve.NamedContexts {
		if ref, ok := strings.CutPrefix(src, "docker-image://"); ok {
			registries = append(registries, registryHost(ref))
		}
	}
	slices.Sort(registries)
	registries = slices.Compact(registries)
	network := job.Network
	if network == "" {
		network = "egress"
	}
	data, _ := json.Marshal(struct {
		Volume     string
		CPUs, Mem  int
		Network    string
		Allowed    []string
		GC         GCPolicy
		Registries []string
		Allow      []string `json:",omitempty"`
	}{job.Volume, job.CPUs, job.MemoryMB, network, allowed, job.GC, registries, sortedCopy(job.Entitlements)})
	return string(data)
}

func sortedCopy(s []string) []string {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// registryHost is the host part of an image reference, as BuildKit reads
// it: the first path component when it looks like a host.
func registryHost(ref string) string {
	if ref == "" {
		return ""
	}
	first, _, ok := strings.Cut(ref, "/")
	if !ok || !strings.ContainsAny(first, ".:") && first != "localhost" {
		return "docker.io"
	}
	return first
}

// ErrBuilderLost wrapped in a Builder.Run error means the builder itself
// failed under the job (a frozen or dead VM, an agent gone), which says
// nothing about the build: the job may run again on a fresh builder, and
// the pool does so once.
var ErrBuilderLost = errors.New("the builder was lost")
