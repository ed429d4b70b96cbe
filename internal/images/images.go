// Package images keeps kiln's image names: a name (repository:tag) is a
// reference to a manifest digest in the embedded registry. Adding a name
// links the digest, never copies or rebuilds it; removing one drops only
// that reference.
package images

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/store"
)

// Image is a name and everything sharing its digest.
type Image struct {
	store.Image
	// Names lists every name pointing at the same digest, this one included.
	Names []string
}

// Errors callers map to HTTP statuses.
var (
	ErrNotFound = errors.New("image not found")
)

// NameError is an invalid image name; the message says how to fix it.
type NameError struct{ Msg string }

func (e *NameError) Error() string { return e.Msg }

// Service manages names.
type Service struct {
	db  *store.DB
	reg *registry.Registry
}

// New returns a Service.
func New(db *store.DB, reg *registry.Registry) *Service { return &Service{db: db, reg: reg} }

// ParseName validates an image name and returns its repository and tag
// (default "latest"). Names live in kiln's registry, so a registry host is
// refused; unless reserved is true, kiln's own builds/ and cache/
// namespaces are refused too.
func ParseName(name string, reserved bool) (repo, tag string, err error) {
	ref, err := reference.Parse(name)
	if err != nil {
		return "", "", &NameError{fmt.Sprintf("image name %q is invalid (%v): use lower-case repository[:tag], e.g. myapp:1.0 or team/app", name, err)}
	}
	named, ok := ref.(reference.Named)
	if !ok {
		return "", "", &NameError{fmt.Sprintf("image name %q has no repository", name)}
	}
	if _, ok := ref.(reference.Digested); ok {
		return "", "", &NameError{fmt.Sprintf("image name %q has a digest; names are repository[:tag]", name)}
	}
	// reference.Parse splits off any first component as a "domain"; like
	// Docker, only one with a dot or port, or localhost, names a registry.
	repo = named.Name()
	if first, _, ok := strings.Cut(repo, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return "", "", &NameError{fmt.Sprintf("image name %q names registry %q: kiln stores images in its own registry, so give just repository[:tag]", name, first)}
	}
	if !reserved && (repo == "builds" || repo == "cache" || strings.HasPrefix(repo, "builds/") || strings.HasPrefix(repo, "cache/")) {
		return "", "", &NameError{fmt.Sprintf("image name %q is in kiln's reserved builds/ or cache/ namespace; pick another repository", name)}
	}
	tag = "latest"
	if t, ok := ref.(reference.Tagged); ok {
		tag = t.Tag()
	}
	return repo, tag, nil
}

// List returns every name.
func (s *Service) List(ctx context.Context) ([]store.Image, error) {
	return store.ListImages(ctx, s.db.SQL, "")
}

// Get returns one name and the names sharing its digest.
func (s *Service) Get(ctx context.Context, name string) (Image, error) {
	repo, tag, err := ParseName(name, true)
	if err != nil {
		return Image{}, err
	}
	im, err := store.GetImage(ctx, s.db.SQL, repo+":"+tag)
	if errors.Is(err, store.ErrNotFound) {
		return Image{}, fmt.Errorf("%w: no image named %s:%s (kiln images ls lists them)", ErrNotFound, repo, tag)
	}
	if err != nil {
		return Image{}, err
	}
	return s.withNames(ctx, im)
}

func (s *Service) withNames(ctx context.Context, im store.Image) (Image, error) {
	same, err := store.ListImages(ctx, s.db.SQL, im.Digest)
	if err != nil {
		return Image{}, err
	}
	out := Image{Image: im}
	for _, o := range same {
		out.Names = append(out.Names, o.Name)
	}
	return out, nil
}

// Tag adds name newName for the digest src points at. The registry links
// the existing manifest and blobs; nothing is rebuilt or copied.
func (s *Service) Tag(ctx context.Context, src, newName string) (Image, error) {
	from, err := s.Get(ctx, src)
	if err != nil {
		return Image{}, err
	}
	repo, tag, err := ParseName(newName, false)
	if err != nil {
		return Image{}, err
	}
	if err := s.reg.Tag(ctx, from.Repository, from.Digest, repo, tag); err != nil {
		return Image{}, fmt.Errorf("add name %s:%s: %w", repo, tag, err)
	}
	im := store.Image{Name: repo + ":" + tag, Repository: repo, Tag: tag, Digest: from.Digest, BuildID: from.BuildID, CreatedAt: time.Now().UTC()}
	if err := store.PutImage(ctx, s.db.SQL, im); err != nil {
		return Image{}, err
	}
	return s.withNames(ctx, im)
}

// Delete removes one name; other names of the same digest keep working.
func (s *Service) Delete(ctx context.Context, name string) error {
	im, err := s.Get(ctx, name)
	if err != nil {
		return err
	}
	if err := s.reg.DeleteTag(ctx, im.Repository, im.Tag); err != nil && !errors.Is(err, registry.ErrNotFound) {
		return fmt.Errorf("remove name %s: %w", im.Name, err)
	}
	return store.DeleteImage(ctx, s.db.SQL, im.Name)
}
