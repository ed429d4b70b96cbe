package access

import (
	"context"
	"slices"
	"strings"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
)

// ParseName checks the syntax of an image name and returns its repository
// and tag (default "latest"). Names live in kiln's registry, so a
// registry host is refused.
func ParseName(name string) (repo, tag string, err error) {
	if len(name) > 512 {
		return "", "", errdefs.Invalid("image name %s is longer than 512 bytes", errdefs.Quote(name))
	}
	ref, err := reference.Parse(name)
	if err != nil {
		return "", "", errdefs.Invalid("image name %s is invalid (%v): use lower-case repository[:tag], e.g. myapp:1.0 or team/app", errdefs.Quote(name), err)
	}
	named, ok := ref.(reference.Named)
	if !ok {
		return "", "", errdefs.Invalid("image name %s has no repository", errdefs.Quote(name))
	}
	if _, ok := ref.(reference.Digested); ok {
		return "", "", errdefs.Invalid("image name %s has a digest; names are repository[:tag]", errdefs.Quote(name))
	}
	// reference.Parse splits off any first component as a "domain"; like
	// Docker, only one with a dot or port, or localhost, names a registry.
	repo = named.Name()
	if first, _, ok := strings.Cut(repo, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return "", "", errdefs.Invalid("image name %s names registry %q, which is not this kiln's: kiln stores images in its own registry, so give repository[:tag] or kiln's own host form (kiln whoami shows it)", errdefs.Quote(name), first)
	}
	tag = "latest"
	if t, ok := ref.(reference.Tagged); ok {
		tag = t.Tag()
	}
	return repo, tag, nil
}

// Resolve turns a name a user gave into the repository and tag it means
// for pr: a one-component name of a tenant's token means <tenant>/name.
// It checks syntax only; ask Repo what pr may do there.
func (p *Policy) Resolve(pr auth.Principal, name string) (repo, tag string, err error) {
	if first, rest, ok := strings.Cut(name, "/"); ok && slices.Contains(p.own, first) {
		name = rest
	}
	repo, tag, err = ParseName(name)
	if err != nil {
		return "", "", err
	}
	if p.Classify(repo).Class == ClassRoot && !admin(pr) && pr.Tenant != "" {
		repo = pr.Tenant + "/" + repo
	}
	return repo, tag, nil
}

// Name resolves a name pr wants to give an image — a build's result (-t)
// or an existing image (images tag) — and checks pr may give it, by
// namespace alone: tags are written by the build path, whatever the
// token's image scopes. kiln's own namespaces are never user names.
func (p *Policy) Name(ctx context.Context, pr auth.Principal, name string) (repo, tag string, err error) {
	repo, tag, err = p.Resolve(pr, name)
	if err != nil {
		return "", "", err
	}
	switch p.Classify(repo).Class {
	case ClassBuild, ClassGlobalCache, ClassReserved, ClassMirror:
		return "", "", errdefs.Invalid("image name %s is in kiln's reserved namespaces (builds/, cache/ and mirror/ are written by kiln itself); pick another repository", errdefs.Quote(name))
	}
	if err := p.namespace(ctx, pr, repo, Push); err != nil {
		return "", "", err
	}
	return repo, tag, nil
}

// ExternalHost reports the registry host a name names when it is not
// kiln's own (ghcr.io/org/app:1, 10.0.0.5:5000/app): the image lives
// elsewhere, and only a build's --push or cache may reach it. Names
// without a host, or with kiln's, are kiln's and ok is false.
func (p *Policy) ExternalHost(name string) (host string, ok bool) {
	first, _, found := strings.Cut(name, "/")
	if !found || !strings.ContainsAny(first, ".:") && first != "localhost" {
		return "", false
	}
	if slices.Contains(p.own, first) {
		return "", false
	}
	return first, true
}

// CanPull checks, by namespace alone, that pr's builds may read repo in
// kiln's registry (a registry cache a build imports): its tenant's own,
// the shared namespaces, or anything for an admin.
func (p *Policy) CanPull(ctx context.Context, pr auth.Principal, repo string) error {
	return p.namespace(ctx, pr, repo, Pull)
}
