package mirror

import (
	"fmt"
	"strings"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// platform is os/arch[/variant], normalized so spellings from config
// ("linux/x86_64", "linux/arm64/v8") compare equal to what indexes say.
type platform struct {
	os, arch, variant string
}

func (p platform) String() string {
	s := p.os + "/" + p.arch
	if p.variant != "" {
		s += "/" + p.variant
	}
	return s
}

func parsePlatform(s string) (platform, error) {
	parts := strings.Split(strings.ToLower(strings.TrimSpace(s)), "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return platform{}, fmt.Errorf("platform %q is invalid: want os/arch[/variant], e.g. linux/amd64 or linux/arm/v7", s)
	}
	p := platform{os: parts[0], arch: parts[1]}
	if len(parts) == 3 {
		p.variant = parts[2]
	}
	return normalizePlatform(p), nil
}

func platformOf(o *v1.Platform) platform {
	return normalizePlatform(platform{os: strings.ToLower(o.OS), arch: strings.ToLower(o.Architecture), variant: strings.ToLower(o.Variant)})
}

func normalizePlatform(p platform) platform {
	switch p.arch {
	case "x86_64", "x86-64":
		p.arch = "amd64"
	case "aarch64":
		p.arch = "arm64"
	case "armhf":
		p.arch, p.variant = "arm", "v7"
	case "armel":
		p.arch, p.variant = "arm", "v6"
	}
	if p.arch == "arm64" && p.variant == "v8" {
		p.variant = "" // the only arm64 variant images use; often left out
	}
	if p.arch == "amd64" && p.variant == "v1" {
		p.variant = ""
	}
	return p
}

// matches reports whether an index child for o serves platform p. A
// wanted platform without a variant takes any variant of its arch.
func (p platform) matches(o *v1.Platform) bool {
	q := platformOf(o)
	if q.os != p.os || q.arch != p.arch {
		return false
	}
	return p.variant == "" || p.variant == q.variant
}
