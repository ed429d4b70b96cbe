// Package images keeps kiln's image names: a name (repository:tag) is a
// reference to a manifest digest in the embedded registry. Adding a name
// links the digest, never copies or rebuilds it; removing one drops only
// that reference.
package images

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/store"
)

// Image is a name and everything sharing its digest.
type Image struct {
	store.Image
	// Names lists every name pointing at the same digest, this one included.
	Names []string
	// Size is the image's compressed size: config and layers.
	Size int64
	// RootFS is where the digest's bootable filesystem stands.
	RootFS RootFS
}

// RootFS is the conversion state of a digest's root filesystem.
type RootFS struct {
	Status string // pending, converting, ready, failed
	Error  string
	Size   int64 // bytes of the filesystem image, once ready
	Format string
}

// Errors callers map to HTTP statuses.
var (
	ErrNotFound = errors.New("image not found")
)

// NameError is an invalid image name; the message says how to fix it.
type NameError struct{ Msg string }

func (e *NameError) Error() string { return e.Msg }

// Service manages names and the digests' converted root filesystems.
type Service struct {
	db   *store.DB
	reg  *registry.Registry
	conv *rootfs.Store
	log  *slog.Logger
	// convSlot serializes background conversions: each is disk- and
	// CPU-heavy, and builds matter more.
	convSlot chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	// builderDir holds the builder VM image that boots images for Run.
	builderDir string
}

// New returns a Service converting digests into conv.
func New(db *store.DB, reg *registry.Registry, conv *rootfs.Store, log *slog.Logger) *Service {
	ctx, cancel := context.WithCancel(context.Background())
	return &Service{db: db, reg: reg, conv: conv, log: log, convSlot: make(chan struct{}, 1), ctx: ctx, cancel: cancel}
}

// Close stops background conversions (a stopped one is redone on the
// next start by Resume).
func (s *Service) Close() {
	s.cancel()
	s.wg.Wait()
}

// Convert makes sure digest's root filesystem gets built, in the
// background. A digest converts once: a ready digest, or one already
// converting, costs nothing more, whatever name or build asks.
func (s *Service) Convert(digest string) {
	if st, _ := s.conv.Status(digest); st == rootfs.StateReady || st == rootfs.StateConverting {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case s.convSlot <- struct{}{}:
		case <-s.ctx.Done():
			return
		}
		defer func() { <-s.convSlot }()
		start := time.Now()
		a, err := s.conv.Ensure(s.ctx, digest)
		switch {
		case err != nil && s.ctx.Err() == nil:
			s.log.Warn("convert image to a root filesystem", "digest", digest, "err", err)
		case err == nil:
			s.log.Info("image root filesystem ready", "digest", digest, "bytes", a.Size, "took", time.Since(start).Round(time.Millisecond))
		}
	}()
}

// Resume queues conversion of every named digest not converted yet, e.g.
// after a restart interrupted one.
func (s *Service) Resume(ctx context.Context) error {
	list, err := store.ListImages(ctx, s.db.SQL, "")
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, im := range list {
		if !seen[im.Digest] {
			seen[im.Digest] = true
			s.Convert(im.Digest)
		}
	}
	return nil
}

// Conversions counts conversions started since the server started.
func (s *Service) Conversions() int64 { return s.conv.Conversions() }

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
	st, msg := s.conv.Status(im.Digest)
	out.RootFS = RootFS{Status: string(st), Error: msg}
	if a, ok := s.conv.Get(im.Digest); ok {
		out.RootFS.Size, out.RootFS.Format = a.Size, string(a.Format)
	}
	if _, body, _, err := s.reg.Manifest(ctx, im.Repository, im.Digest); err == nil {
		out.Size = manifestSize(body)
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
	s.Convert(im.Digest) // a no-op for a converted digest
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
	if err := store.DeleteImage(ctx, s.db.SQL, im.Name); err != nil {
		return err
	}
	// The converted filesystem goes with the digest's last name.
	if rest, err := store.ListImages(ctx, s.db.SQL, im.Digest); err == nil && len(rest) == 0 {
		if err := s.conv.Remove(im.Digest); err != nil {
			s.log.Warn("remove converted root filesystem", "digest", im.Digest, "err", err)
		}
	}
	return nil
}

// manifestSize sums the config and layer sizes of an image manifest
// (0 for an index, whose size depends on the platform picked).
func manifestSize(body []byte) int64 {
	var m struct {
		Config struct{ Size int64 }
		Layers []struct{ Size int64 }
	}
	if json.Unmarshal(body, &m) != nil {
		return 0
	}
	n := m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}

// ExportFilesystem writes the flattened filesystem of digest as a tar
// (`--output type=tar` / `type=local`).
func (s *Service) ExportFilesystem(ctx context.Context, digest string, w io.Writer) error {
	return s.conv.ExportTar(ctx, digest, w)
}

// ExportImage writes digest as an OCI layout tar that docker load, podman
// and skopeo import (`--output type=oci` / `type=docker`); name becomes its
// reference name.
func (s *Service) ExportImage(ctx context.Context, digest, name string, w io.Writer) error {
	return s.conv.ExportOCI(ctx, digest, name, w)
}
