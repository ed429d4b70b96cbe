package builds

import (
	goruntime "runtime"
	"slices"
	"strings"

	"github.com/containerd/platforms"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/store"
)

// hostPlatform is the platform builders run natively: BuildKit's
// BUILDPLATFORM, and what a build without --platform is built for.
var hostPlatform = "linux/" + goruntime.GOARCH

// maxPlatforms bounds one build's platform list: each one is a full build
// of every stage that depends on TARGETPLATFORM.
const maxPlatforms = 8

// validatePlatforms reads --platform as buildx does (comma-separated,
// repeatable; "local" is the builder's own), normalizes each entry
// (linux/arm64/v8 is linux/arm64, linux/arm is linux/arm/v7) and asks the
// runtime whether it can build them, so a platform the builder cannot
// run is refused before anything is queued.
func (s *Service) validatePlatforms(req *Request, o *store.BuildOptions) error {
	var out []string
	for _, field := range req.Platforms {
		for _, raw := range strings.Split(field, ",") {
			raw = strings.TrimSpace(raw)
			if raw == "" {
				continue
			}
			p := hostPlatform
			if raw != "local" {
				parsed, err := platforms.Parse(raw)
				if err != nil {
					return badRequest("platform %s is not a platform: use os/arch[/variant], like linux/arm64 or linux/arm/v7", errdefs.Quote(raw))
				}
				if parsed.OS != "linux" {
					return badRequest("platform %s: kiln builds Linux images only; use linux/%s", errdefs.Quote(raw), parsed.Architecture)
				}
				p = platforms.Format(platforms.Normalize(parsed))
			}
			if slices.Contains(out, p) {
				return badRequest("platform %s is listed twice; list each platform once", p)
			}
			out = append(out, p)
		}
	}
	if len(out) > maxPlatforms {
		return badRequest("%d platforms is more than the %d one build may have; split the build", len(out), maxPlatforms)
	}
	if len(out) == 0 {
		return nil
	}
	if pc, ok := s.runtime.(runtime.PlatformChecker); ok {
		if err := pc.CheckPlatforms(out); err != nil {
			return err
		}
	}
	o.Platforms = out
	return nil
}

// targetPlatforms are the platforms a build produces, in order.
func targetPlatforms(o store.BuildOptions) []string {
	if len(o.Platforms) == 0 {
		return []string{hostPlatform}
	}
	return o.Platforms
}

// platformKey is the build's platform set as the input hash sees it. One
// platform asked for explicitly builds what no --platform builds, so both
// hash alike (and as every build did before --platform existed).
func platformKey(o store.BuildOptions) string {
	return strings.Join(targetPlatforms(o), ",")
}

// platformArgs are BuildKit's automatic platform build args for a build
// of target on this builder.
func platformArgs(target string) []string {
	p, _ := platforms.Parse(target)
	b, _ := platforms.Parse(hostPlatform)
	return []string{"TARGETPLATFORM=" + target, "TARGETOS=" + p.OS, "TARGETARCH=" + p.Architecture, "TARGETVARIANT=" + p.Variant,
		"BUILDPLATFORM=" + hostPlatform, "BUILDOS=" + b.OS, "BUILDARCH=" + b.Architecture, "BUILDVARIANT=" + b.Variant}
}
