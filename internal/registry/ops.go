package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/manifest/manifestlist"
	"github.com/distribution/distribution/v3/manifest/ocischema"
	"github.com/distribution/distribution/v3/registry/storage"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// ErrNotFound is wrapped by every helper error about a repository, tag,
// manifest or blob that does not exist.
var ErrNotFound = errdefs.Sentinel(errdefs.ErrNotFound, "not found")

// maxIndexDepth bounds index-in-index nesting when copying, so a hostile
// manifest cannot make Tag recurse without end.
const maxIndexDepth = 4

// Resolve returns the manifest digest repo:tag points at.
func (r *Registry) Resolve(ctx context.Context, repo, tag string) (string, error) {
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return "", fmt.Errorf("resolve %s:%s: %w", repo, tag, err)
	}
	d, err := resolveRef(ctx, rp, tag)
	if err != nil {
		return "", fmt.Errorf("resolve %s:%s: %w", repo, tag, err)
	}
	return d.String(), nil
}

// Manifest returns the manifest repo@ref (ref a tag or a digest) exactly as
// stored, with its media type and digest.
func (r *Registry) Manifest(ctx context.Context, repo, ref string) (mediaType string, body []byte, dgst string, err error) {
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return "", nil, "", fmt.Errorf("get manifest %s %s: %w", repo, ref, err)
	}
	d, err := resolveRef(ctx, rp, ref)
	if err != nil {
		return "", nil, "", fmt.Errorf("get manifest %s %s: %w", repo, ref, err)
	}
	m, err := getManifest(ctx, rp, d)
	if err != nil {
		return "", nil, "", fmt.Errorf("get manifest %s %s: %w", repo, ref, err)
	}
	mediaType, body, err = m.Payload()
	if err != nil {
		return "", nil, "", fmt.Errorf("get manifest %s@%s: %w", repo, d, err)
	}
	return mediaType, body, d.String(), nil
}

// Tag makes dstRepo:dstTag point at the manifest srcRepo@reference
// (reference a tag or a digest). Across repositories it links the
// manifest, any child manifests of an index (attestation manifests
// included), and all their blobs into dstRepo first, so the new name
// pulls completely even if dstRepo is new. Nothing is copied: blobs are
// shared by digest. A linked manifest with a subject is indexed in
// dstRepo, so dstRepo's referrers API lists it. Referrers that were
// pushed to srcRepo separately (a signature attached with oras or
// cosign) stay there: they are statements made in srcRepo, and Tag also
// links across tenants (a deduplicated build), whose artifacts must not
// travel with the image.
func (r *Registry) Tag(ctx context.Context, srcRepo, ref, dstRepo, dstTag string) error {
	fail := func(err error) error {
		return fmt.Errorf("tag %s %s as %s:%s: %w", srcRepo, ref, dstRepo, dstTag, err)
	}
	src, err := r.repository(ctx, srcRepo)
	if err != nil {
		return fail(err)
	}
	dst, err := r.repository(ctx, dstRepo)
	if err != nil {
		return fail(err)
	}
	if _, err := reference.WithTag(dst.Named(), dstTag); err != nil {
		return fail(fmt.Errorf("tag %q is invalid: use up to 128 characters from letters, digits, '_', '.', '-', not starting with '.' or '-'", dstTag))
	}
	d, err := resolveRef(ctx, src, ref)
	if err != nil {
		return fail(err)
	}
	if src.Named().Name() != dst.Named().Name() {
		if err := r.linkManifest(ctx, src, dst, d, 0); err != nil {
			return fail(err)
		}
	}
	if err := dst.Tags(ctx).Tag(ctx, dstTag, v1.Descriptor{Digest: d}); err != nil {
		return fail(err)
	}
	return nil
}

// DeleteTag removes repo:tag. Other names for the same digest keep
// working. When no other tag of repo points at the manifest, repo's link
// to it goes too, so a GC can reclaim the blobs only it referenced.
func (r *Registry) DeleteTag(ctx context.Context, repo, tag string) error {
	fail := func(err error) error { return fmt.Errorf("delete tag %s:%s: %w", repo, tag, mapNotFound(err)) }
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return fail(err)
	}
	tags := rp.Tags(ctx)
	desc, err := tags.Get(ctx, tag)
	if err != nil {
		return fail(err)
	}
	if err := tags.Untag(ctx, tag); err != nil {
		return fail(err)
	}
	still, err := tags.Lookup(ctx, desc)
	if err != nil && !errors.Is(mapNotFound(err), ErrNotFound) {
		return fail(fmt.Errorf("look up other tags of %s: %w", desc.Digest, err))
	}
	if len(still) > 0 {
		return nil
	}
	ms, err := rp.Manifests(ctx)
	if err != nil {
		return fail(err)
	}
	if err := ms.Delete(ctx, desc.Digest); err != nil && !errors.Is(mapNotFound(err), ErrNotFound) {
		return fail(fmt.Errorf("drop the untagged manifest %s: %w", desc.Digest, err))
	}
	return nil
}

// Catalog lists every repository, sorted.
func (r *Registry) Catalog(ctx context.Context) ([]string, error) {
	enum, ok := r.ns.(distribution.RepositoryEnumerator)
	if !ok {
		return nil, errors.New("list repositories: storage cannot enumerate repositories")
	}
	var repos []string
	err := enum.Enumerate(ctx, func(name string) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		repos = append(repos, name)
		return nil
	})
	if err != nil && !isMissing(err) { // an empty registry has no repositories dir yet
		return nil, fmt.Errorf("list repositories: %w", err)
	}
	slices.Sort(repos)
	return repos, nil
}

// Tags lists the tags of repo, sorted.
func (r *Registry) Tags(ctx context.Context, repo string) ([]string, error) {
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return nil, fmt.Errorf("list tags of %s: %w", repo, err)
	}
	tags, err := rp.Tags(ctx).All(ctx)
	if err != nil {
		return nil, fmt.Errorf("list tags of %s: %w", repo, mapNotFound(err))
	}
	return tags, nil
}

func (r *Registry) repository(ctx context.Context, name string) (distribution.Repository, error) {
	named, err := reference.WithName(name)
	if err != nil {
		return nil, fmt.Errorf("repository name %q is invalid (use lowercase path components like \"team/app\"): %w", name, err)
	}
	return r.ns.Repository(ctx, named)
}

// resolveRef turns a tag or digest into a digest whose manifest exists in rp.
func resolveRef(ctx context.Context, rp distribution.Repository, ref string) (digest.Digest, error) {
	var d digest.Digest
	if strings.Contains(ref, ":") {
		parsed, err := digest.Parse(ref)
		if err != nil {
			return "", fmt.Errorf("reference %q is neither a tag nor a valid digest: %w", ref, err)
		}
		d = parsed
	} else {
		if _, err := reference.WithTag(rp.Named(), ref); err != nil {
			return "", fmt.Errorf("tag %q is invalid: %w", ref, err)
		}
		desc, err := rp.Tags(ctx).Get(ctx, ref)
		if err != nil {
			return "", mapNotFound(err)
		}
		d = desc.Digest
	}
	ms, err := rp.Manifests(ctx)
	if err != nil {
		return "", err
	}
	ok, err := ms.Exists(ctx, d)
	if err != nil {
		return "", mapNotFound(err)
	}
	if !ok {
		return "", fmt.Errorf("manifest %s in %s: %w", d, rp.Named().Name(), ErrNotFound)
	}
	return d, nil
}

func getManifest(ctx context.Context, rp distribution.Repository, d digest.Digest) (distribution.Manifest, error) {
	ms, err := rp.Manifests(ctx)
	if err != nil {
		return nil, err
	}
	m, err := ms.Get(ctx, d)
	if err != nil {
		return nil, mapNotFound(err)
	}
	return m, nil
}

// linkManifest makes manifest d of src, and everything it references,
// available in dst, and indexes it in dst when it has a subject.
func (r *Registry) linkManifest(ctx context.Context, src, dst distribution.Repository, d digest.Digest, depth int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if depth > maxIndexDepth {
		return fmt.Errorf("manifest %s: indexes nested deeper than %d levels", d, maxIndexDepth)
	}
	dstMS, err := dst.Manifests(ctx)
	if err != nil {
		return err
	}
	if ok, err := dstMS.Exists(ctx, d); err == nil && ok {
		return nil // a manifest only lands in a repo after its references
	}
	stored := d
	if d.Algorithm() != digest.SHA256 {
		// Pushed by another digest (sha512): stored under the sha256
		// src's alias names, linked as that, then given the alias.
		if stored, err = r.alias(ctx, src.Named().Name(), d); err != nil {
			return fmt.Errorf("manifest %s: %w", d, err)
		}
		if stored == "" {
			return fmt.Errorf("manifest %s in %s: %w", d, src.Named().Name(), ErrNotFound)
		}
	}
	m, err := getManifest(ctx, src, stored)
	if err != nil {
		return fmt.Errorf("manifest %s: %w", d, err)
	}
	switch m.(type) {
	case *ocischema.DeserializedImageIndex, *manifestlist.DeserializedManifestList:
		for _, child := range m.References() {
			if err := r.linkManifest(ctx, src, dst, child.Digest, depth+1); err != nil {
				return err
			}
		}
	default:
		for _, blob := range m.References() {
			if err := r.linkBlob(ctx, src, dst, blob.Digest); err != nil {
				return err
			}
		}
	}
	got, err := dstMS.Put(ctx, m)
	if err != nil {
		return fmt.Errorf("store manifest %s in %s: %w", d, dst.Named().Name(), err)
	}
	if got != stored {
		return fmt.Errorf("manifest %s changed digest to %s when stored in %s", stored, got, dst.Named().Name())
	}
	if d != stored {
		if err := r.writeLink(ctx, aliasPath(dst.Named().Name(), d), stored); err != nil {
			return fmt.Errorf("link manifest %s into %s as %s: %w", stored, dst.Named().Name(), d, err)
		}
	}
	mt, body, err := m.Payload()
	if err != nil {
		return fmt.Errorf("manifest %s: %w", d, err)
	}
	// Indexed by the name it was pushed by, as its push indexed it.
	_, err = r.indexReferrer(ctx, dst.Named().Name(), d, mt, body)
	return err
}

// linkBlob mounts blob d from src into dst, the same cross-repository
// mount a client gets with POST /v2/<dst>/blobs/uploads/?mount=d&from=src.
func (r *Registry) linkBlob(ctx context.Context, src, dst distribution.Repository, d digest.Digest) error {
	blobs := dst.Blobs(ctx)
	if _, err := blobs.Stat(ctx, d); err == nil {
		return nil
	}
	canonical, err := reference.WithDigest(src.Named(), d)
	if err != nil {
		return fmt.Errorf("blob %s: %w", d, err)
	}
	w, err := blobs.Create(ctx, storage.WithMountFrom(canonical))
	var mounted distribution.ErrBlobMounted
	if errors.As(err, &mounted) {
		if d.Algorithm() != digest.SHA256 {
			// As over HTTP: distribution links d to itself.
			return r.fixMountedAlias(ctx, src.Named().Name(), dst.Named().Name(), d)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("link blob %s into %s: %w", d, dst.Named().Name(), err)
	}
	// The mount fell through to a fresh upload: the source lacks the blob.
	_ = w.Cancel(ctx)
	return fmt.Errorf("blob %s is missing from %s: %w", d, src.Named().Name(), ErrNotFound)
}

func mapNotFound(err error) error {
	var (
		tagUnknown  distribution.ErrTagUnknown
		repoUnknown distribution.ErrRepositoryUnknown
		revUnknown  distribution.ErrManifestUnknownRevision
		mfUnknown   distribution.ErrManifestUnknown
	)
	switch {
	case errors.As(err, &tagUnknown), errors.As(err, &repoUnknown), errors.As(err, &revUnknown),
		errors.As(err, &mfUnknown), isMissing(err), errors.Is(err, distribution.ErrBlobUnknown):
		return fmt.Errorf("%w: %v", ErrNotFound, err)
	}
	return err
}
