package registry

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/manifest/manifestlist"
	"github.com/distribution/distribution/v3/manifest/ocischema"
	"github.com/distribution/distribution/v3/registry/storage"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrDigestMismatch is wrapped by PutBlob and PutManifest errors when the
// content handed over does not hash to (or is not the size of) the digest
// it was offered as.
var ErrDigestMismatch = errors.New("content does not match its digest")

// MaxManifestSize bounds a manifest PutManifest accepts; distribution's
// HTTP API refuses bigger ones too.
const MaxManifestSize = 4 << 20

// HasBlob reports whether blob dgst is available in repo, i.e. whether a
// client pulling from repo can fetch it.
func (r *Registry) HasBlob(ctx context.Context, repo, dgst string) (bool, error) {
	d, err := parseIngestDigest(dgst)
	if err != nil {
		return false, fmt.Errorf("check blob in %s: %w", repo, err)
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return false, fmt.Errorf("check blob %s in %s: %w", d, repo, err)
	}
	_, err = rp.Blobs(ctx).Stat(ctx, d)
	if errors.Is(err, distribution.ErrBlobUnknown) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("check blob %s in %s: %w", d, repo, err)
	}
	return true, nil
}

// LinkBlob makes blob dgst available in repo when the store already holds
// its content under any repository, without copying a byte, and reports
// whether the blob is now available there. It returns false, nil when the
// store has never seen the content: the caller must PutBlob it.
func (r *Registry) LinkBlob(ctx context.Context, repo, dgst string) (bool, error) {
	d, err := parseIngestDigest(dgst)
	if err != nil {
		return false, fmt.Errorf("link blob into %s: %w", repo, err)
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return false, fmt.Errorf("link blob %s into %s: %w", d, repo, err)
	}
	blobs := rp.Blobs(ctx)
	if _, err := blobs.Stat(ctx, d); err == nil {
		return true, nil
	}
	desc, err := r.ns.BlobStatter().Stat(ctx, d)
	if errors.Is(err, distribution.ErrBlobUnknown) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("link blob %s into %s: %w", d, repo, err)
	}
	// A mount with a known descriptor links straight from the global
	// content store; the source name only has to be a valid reference.
	canonical, err := reference.WithDigest(rp.Named(), d)
	if err != nil {
		return false, fmt.Errorf("link blob %s into %s: %w", d, repo, err)
	}
	w, err := blobs.Create(ctx, ingestMount{from: canonical, stat: desc})
	var mounted distribution.ErrBlobMounted
	if errors.As(err, &mounted) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("link blob %s into %s: %w", d, repo, err)
	}
	_ = w.Cancel(context.WithoutCancel(ctx))
	return false, fmt.Errorf("link blob %s into %s: the store did not link existing content", d, repo)
}

// ingestMount is storage.WithMountFrom plus the descriptor, which makes the
// mount skip the per-repository access check on the source.
type ingestMount struct {
	from reference.Canonical
	stat v1.Descriptor
}

func (o ingestMount) Apply(v any) error {
	opts, ok := v.(*distribution.CreateOptions)
	if !ok {
		return fmt.Errorf("blob create option applied to %T", v)
	}
	opts.Mount.ShouldMount = true
	opts.Mount.From = o.from
	stat := o.stat
	opts.Mount.Stat = &stat
	return nil
}

// PutBlob streams exactly size bytes from rd into repo as blob dgst. The
// content is hashed while it is written and only becomes visible if it
// matches dgst and size; otherwise the upload is discarded and the error
// wraps ErrDigestMismatch. Nothing is buffered in memory beyond a copy
// buffer, so layers of any size are fine. Canceling ctx aborts the copy
// and discards the partial upload.
func (r *Registry) PutBlob(ctx context.Context, repo, dgst string, size int64, rd io.Reader) (err error) {
	d, err := parseIngestDigest(dgst)
	if err != nil {
		return fmt.Errorf("store blob in %s: %w", repo, err)
	}
	fail := func(err error) error { return fmt.Errorf("store blob %s in %s: %w", d, repo, err) }
	if size < 0 {
		return fail(fmt.Errorf("size %d is negative", size))
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return fail(err)
	}
	w, err := rp.Blobs(ctx).Create(ctx)
	if err != nil {
		return fail(err)
	}
	committed := false
	defer func() {
		if !committed {
			// The upload directory would otherwise linger until the purger
			// runs a day later.
			_ = w.Cancel(context.WithoutCancel(ctx))
		}
	}()

	// The content is verified here as well as by Commit: a writer whose
	// Commit failed can no longer be canceled, so its upload would stay on
	// disk until the purger runs.
	if !d.Algorithm().Available() {
		return fail(fmt.Errorf("digest algorithm %s is not supported", d.Algorithm()))
	}
	h := d.Algorithm().Hash()
	// One byte more than announced is enough to tell a too-long body.
	n, err := io.Copy(w, io.TeeReader(io.LimitReader(ingestCtxReader{ctx, rd}, size+1), h))
	if err != nil {
		return fail(err)
	}
	if n != size {
		return fail(fmt.Errorf("%w: got %s bytes, want %d", ErrDigestMismatch, ingestCount(n, size), size))
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return fail(fmt.Errorf("%w: the content's digest is %s", ErrDigestMismatch, got))
	}
	if _, err := w.Commit(ctx, v1.Descriptor{Digest: d, Size: size}); err != nil {
		var bad distribution.ErrBlobInvalidDigest
		if errors.As(err, &bad) || errors.Is(err, distribution.ErrBlobInvalidLength) {
			return fail(fmt.Errorf("%w: %v", ErrDigestMismatch, err))
		}
		return fail(err)
	}
	committed = true
	return nil
}

func ingestCount(n, size int64) string {
	if n > size {
		return "more than that"
	}
	return fmt.Sprint(n)
}

// HasManifest reports whether manifest dgst is stored in repo.
func (r *Registry) HasManifest(ctx context.Context, repo, dgst string) (bool, error) {
	d, err := parseIngestDigest(dgst)
	if err != nil {
		return false, fmt.Errorf("check manifest in %s: %w", repo, err)
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return false, fmt.Errorf("check manifest %s in %s: %w", d, repo, err)
	}
	ms, err := rp.Manifests(ctx)
	if err != nil {
		return false, fmt.Errorf("check manifest %s in %s: %w", d, repo, err)
	}
	ok, err := ms.Exists(ctx, d)
	if err != nil && !errors.Is(mapNotFound(err), ErrNotFound) {
		return false, fmt.Errorf("check manifest %s in %s: %w", d, repo, err)
	}
	return ok && err == nil, nil
}

// PutManifest stores body, a manifest of mediaType (OCI image manifest or
// index, Docker schema2 manifest or manifest list), in repo byte for byte,
// so it keeps its digest, and points tag at it unless tag is empty. It
// returns the manifest's digest.
//
// An image manifest is refused unless its config and layers are already in
// repo (PutBlob or LinkBlob them first). An index is accepted with children
// missing: a mirror keeps only the platforms kiln builds for, and a client
// asking for another platform's child gets "manifest unknown".
func (r *Registry) PutManifest(ctx context.Context, repo, mediaType string, body []byte, tag string) (string, error) {
	dgst := digest.FromBytes(body)
	fail := func(err error) error { return fmt.Errorf("store manifest %s in %s: %w", dgst, repo, err) }
	if len(body) > MaxManifestSize {
		return "", fail(fmt.Errorf("manifest is %d bytes, over the %d byte limit", len(body), MaxManifestSize))
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return "", fail(err)
	}
	if tag != "" {
		if _, err := reference.WithTag(rp.Named(), tag); err != nil {
			return "", fail(fmt.Errorf("tag %q is invalid: use up to 128 characters from letters, digits, '_', '.', '-', not starting with '.' or '-'", tag))
		}
	}
	if !ingestableManifestType(mediaType) {
		return "", fail(fmt.Errorf("media type %q is not a supported manifest type (want an OCI image manifest or index, or a Docker schema2 manifest or manifest list)", mediaType))
	}
	m, _, err := distribution.UnmarshalManifest(mediaType, body)
	if err != nil {
		return "", fail(fmt.Errorf("manifest is not a valid %s: %w", mediaType, err))
	}
	var opts []distribution.ManifestServiceOption
	switch m.(type) {
	case *ocischema.DeserializedImageIndex, *manifestlist.DeserializedManifestList:
		opts = append(opts, storage.SkipLayerVerification())
	}
	ms, err := rp.Manifests(ctx, opts...)
	if err != nil {
		return "", fail(err)
	}
	got, err := ms.Put(ctx, m)
	if err != nil {
		var missing distribution.ErrManifestVerification
		if errors.As(err, &missing) {
			return "", fail(fmt.Errorf("it references content missing from %s, store its blobs first: %w: %v", repo, ErrNotFound, err))
		}
		return "", fail(err)
	}
	if got != dgst {
		// Only possible if the manifest was re-serialized; the stored copy
		// would then not be what the digest pins.
		return "", fail(fmt.Errorf("%w: stored as %s", ErrDigestMismatch, got))
	}
	if _, err := r.indexReferrer(ctx, repo, dgst, mediaType, body); err != nil {
		return "", fail(err)
	}
	if tag != "" {
		if err := rp.Tags(ctx).Tag(ctx, tag, v1.Descriptor{Digest: dgst}); err != nil {
			return "", fail(fmt.Errorf("tag %s: %w", tag, err))
		}
	}
	return dgst.String(), nil
}

func ingestableManifestType(mt string) bool {
	switch mt {
	case v1.MediaTypeImageManifest, v1.MediaTypeImageIndex,
		manifestlist.MediaTypeManifestList, "application/vnd.docker.distribution.manifest.v2+json":
		return true
	}
	return false
}

func parseIngestDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", fmt.Errorf("%q is not a valid digest (want algorithm:hex, e.g. sha256:...): %w", s, err)
	}
	return d, nil
}

// ingestCtxReader stops a long copy as soon as ctx is canceled, even when the
// underlying reader does not watch ctx itself.
type ingestCtxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ingestCtxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
