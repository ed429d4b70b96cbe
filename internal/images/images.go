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
	"path"
	"strings"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
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

// ErrNotFound: no such image name, or none the caller may see.
var ErrNotFound = fmt.Errorf("image %w", errdefs.ErrNotFound)

// Service manages names and the digests' converted root filesystems.
type Service struct {
	db     *store.DB
	reg    *registry.Registry
	conv   *rootfs.Store
	policy *access.Policy
	log    *slog.Logger
	// convSlot serializes background conversions: each is disk- and
	// CPU-heavy, and builds matter more.
	convSlot chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	// builderDir holds the builder VM image that boots images for Run.
	builderDir string
	// sizes caches each digest's compressed size: a digest is immutable,
	// so its size is read from its manifest once.
	sizeMu sync.Mutex
	sizes  map[string]int64
}

// New returns a Service converting digests into conv. It keeps the
// image records in step with manifests pushed straight to the registry.
func New(db *store.DB, reg *registry.Registry, conv *rootfs.Store, policy *access.Policy, log *slog.Logger) *Service {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{db: db, reg: reg, conv: conv, policy: policy, log: log, convSlot: make(chan struct{}, 1), ctx: ctx, cancel: cancel,
		sizes: map[string]int64{}}
	reg.OnManifestChange(func(ctx context.Context, repo, tag string) {
		if err := s.syncTags(ctx, repo, tag); err != nil {
			s.log.Error("record a manifest pushed to the registry", "repository", repo, "err", err)
		}
	})
	return s
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
		case errors.Is(err, rootfs.ErrUnconvertible):
			// A registry cache or another artifact: nothing boots it.
			s.log.Info("no root filesystem for a manifest that is not a runnable image", "digest", digest, "reason", err)
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
		if seen[im.Digest] {
			continue
		}
		seen[im.Digest] = true
		// At start only a failure recorded on disk is known: the image
		// itself cannot convert, and trying again changes nothing.
		if st, _ := s.conv.Status(im.Digest); st == rootfs.StateFailed {
			continue
		}
		s.Convert(im.Digest)
	}
	return nil
}

// Conversions counts conversions started since the server started.
func (s *Service) Conversions() int64 { return s.conv.Conversions() }

// ListOptions selects the names List returns.
type ListOptions struct {
	// Filter keeps names starting with it, or matching it as a glob
	// (see Match); empty keeps all.
	Filter string
	// NoBuilds leaves out the per-build names builds/<id>:latest.
	NoBuilds bool
}

// List returns every name pr may pull that opts selects, by name, each
// with its compressed size (Names and RootFS are not filled in).
func (s *Service) List(ctx context.Context, pr auth.Principal, opts ListOptions) ([]Image, error) {
	if err := ValidFilter(opts.Filter); err != nil {
		return nil, err
	}
	all, err := store.ListImages(ctx, s.db.SQL, "")
	if err != nil {
		return nil, err
	}
	tenant := ""
	if !pr.Has(auth.ScopeBuildAdmin) {
		tenant = pr.Tenant
	}
	var picked []store.Image
	for _, im := range all {
		if opts.NoBuilds && s.policy.Classify(im.Repository).Class == access.ClassBuild {
			continue
		}
		if !Match(opts.Filter, tenant, im.Repository, im.Tag) {
			continue
		}
		picked = append(picked, im)
	}
	visible, err := s.visible(ctx, pr, picked)
	if err != nil {
		return nil, err
	}
	out := make([]Image, 0, len(visible))
	for _, im := range visible {
		out = append(out, Image{Image: im, Size: s.size(ctx, im.Repository, im.Digest)})
	}
	return out, nil
}

// size is digest's compressed size (config and layers), read from its
// manifest in repo the first time and cached: a digest never changes. A
// manifest that cannot be read counts 0 and is read again next time.
func (s *Service) size(ctx context.Context, repo, digest string) int64 {
	s.sizeMu.Lock()
	n, ok := s.sizes[digest]
	s.sizeMu.Unlock()
	if ok {
		return n
	}
	_, body, _, err := s.reg.Manifest(ctx, repo, digest)
	if err != nil {
		return 0
	}
	n = manifestSize(body)
	s.sizeMu.Lock()
	s.sizes[digest] = n
	s.sizeMu.Unlock()
	return n
}

// ValidFilter checks a name filter: a glob must be well-formed.
func ValidFilter(filter string) error {
	if _, err := path.Match(filter, ""); err != nil {
		return errdefs.Invalid("invalid image filter %s: %v (use a repository prefix such as team-a/ or a glob such as 'team-a/*')", errdefs.Quote(filter), err)
	}
	return nil
}

// Match reports whether the name repo:tag passes filter. An empty filter
// passes everything; a filter without glob characters passes names that
// start with it (team-a/, team-a/app, app:1); a glob (team-a/*, app:v1.*)
// is matched against the repository, or against the whole name when it
// holds a ':'. For a tenant, a filter with no '/' is also tried below the
// tenant's namespace, as the tenant's names are given (app means
// <tenant>/app).
func Match(filter, tenant, repo, tag string) bool {
	if filter == "" {
		return true
	}
	try := []string{filter}
	if tenant != "" && !strings.Contains(filter, "/") {
		try = append(try, tenant+"/"+filter)
	}
	name := repo + ":" + tag
	for _, f := range try {
		if !strings.ContainsAny(f, `*?[\`) {
			if strings.HasPrefix(name, f) {
				return true
			}
			continue
		}
		subject := repo
		if strings.Contains(f, ":") {
			subject = name
		}
		if ok, _ := path.Match(f, subject); ok {
			return true
		}
	}
	return false
}

// visible keeps the names pr may pull.
func (s *Service) visible(ctx context.Context, pr auth.Principal, list []store.Image) ([]store.Image, error) {
	var out []store.Image
	seen := map[string]error{}
	for _, im := range list {
		err, ok := seen[im.Repository]
		if !ok {
			err = s.policy.Repo(ctx, pr, im.Repository, access.Pull)
			seen[im.Repository] = err
		}
		switch {
		case err == nil:
			out = append(out, im)
		case !errors.Is(err, errdefs.ErrNotFound) && !errors.Is(err, errdefs.ErrForbidden):
			return nil, err
		}
	}
	return out, nil
}

// Get returns the image a name means to pr (a tenant's app:1 is
// <tenant>/app:1) and the names sharing its digest that pr may see. A name
// pr may not pull is not found.
func (s *Service) Get(ctx context.Context, pr auth.Principal, name string) (Image, error) {
	repo, tag, err := s.policy.Resolve(pr, name)
	if err != nil {
		return Image{}, err
	}
	notFound := fmt.Errorf("%w: no image named %s:%s (kiln images ls lists them)", ErrNotFound, repo, tag)
	if err := s.policy.Repo(ctx, pr, repo, access.Pull); err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return Image{}, notFound
		}
		return Image{}, err
	}
	im, err := store.GetImage(ctx, s.db.SQL, repo+":"+tag)
	if errors.Is(err, store.ErrNotFound) {
		return Image{}, notFound
	}
	if err != nil {
		return Image{}, err
	}
	return s.withNames(ctx, pr, im)
}

func (s *Service) withNames(ctx context.Context, pr auth.Principal, im store.Image) (Image, error) {
	same, err := store.ListImages(ctx, s.db.SQL, im.Digest)
	if err != nil {
		return Image{}, err
	}
	// Another tenant's name for the same digest would tell that it
	// built the same thing.
	if same, err = s.visible(ctx, pr, same); err != nil {
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
	out.Size = s.size(ctx, im.Repository, im.Digest)
	return out, nil
}

// Tag adds name newName for the digest src points at. The registry links
// the existing manifest and blobs; nothing is rebuilt or copied. pr must
// be able to pull src and to give the new name (access.Policy.Name).
func (s *Service) Tag(ctx context.Context, pr auth.Principal, src, newName string) (Image, error) {
	from, err := s.Get(ctx, pr, src)
	if err != nil {
		return Image{}, err
	}
	repo, tag, err := s.policy.Name(ctx, pr, newName)
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
	return s.withNames(ctx, pr, im)
}

// Delete removes one name pr may delete; other names of the same digest
// keep working.
func (s *Service) Delete(ctx context.Context, pr auth.Principal, name string) error {
	im, err := s.Get(ctx, pr, name)
	if err != nil {
		return err
	}
	if err := s.policy.Repo(ctx, pr, im.Repository, access.Delete); err != nil {
		return err
	}
	if err := s.reg.DeleteTag(ctx, im.Repository, im.Tag); err != nil && !errors.Is(err, registry.ErrNotFound) {
		return fmt.Errorf("remove name %s: %w", im.Name, err)
	}
	if err := store.DeleteImage(ctx, s.db.SQL, im.Name); err != nil {
		return err
	}
	s.dropUnnamed(ctx, im.Digest)
	return nil
}

// dropUnnamed removes a digest's converted filesystem once no name
// refers to it.
func (s *Service) dropUnnamed(ctx context.Context, digest string) {
	if rest, err := store.ListImages(ctx, s.db.SQL, digest); err == nil && len(rest) == 0 {
		if err := s.conv.Remove(digest); err != nil {
			s.log.Warn("remove converted root filesystem", "digest", digest, "err", err)
		}
	}
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
func (s *Service) ExportFilesystem(ctx context.Context, digest, platform string, w io.Writer) error {
	return s.conv.ExportTar(ctx, digest, platform, w)
}

// ExportImage writes digest as an OCI layout tar that docker load, podman
// and skopeo import (`--output type=oci` / `type=docker`); name becomes its
// reference name.
func (s *Service) ExportImage(ctx context.Context, digest, name, platform string, w io.Writer) error {
	return s.conv.ExportOCI(ctx, digest, name, platform, w)
}

// ExportImageIndex writes index digest whole (every platform's image and
// its attestations) as an OCI layout tar; name becomes its reference name.
func (s *Service) ExportImageIndex(ctx context.Context, digest, name string, w io.Writer) error {
	return s.conv.ExportOCIIndex(ctx, digest, name, w)
}
