package registry

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/distribution/distribution/v3"
	"github.com/opencontainers/go-digest"
)

// Blob opens the content with digest dgst (a layer, a config or a
// manifest) from the registry's content store, whichever repository it was
// pushed to. Content is addressed by digest and shared by all repositories,
// which is what digest-keyed consumers such as the rootfs converter need.
// It bypasses repository access control: pass only digests kiln itself
// recorded or read from a manifest, never one a client merely named.
func (r *Registry) Blob(ctx context.Context, dgst string) (io.ReadCloser, error) {
	d, err := digest.Parse(dgst)
	if err != nil {
		return nil, fmt.Errorf("open blob %q: not a valid digest (want algorithm:hex, e.g. sha256:...): %w", dgst, err)
	}
	// The storage's global blob store can open any blob by digest; the
	// Namespace interface only exposes it as an enumerator.
	opener, ok := r.ns.Blobs().(interface {
		Open(context.Context, digest.Digest) (io.ReadSeekCloser, error)
	})
	if !ok {
		return nil, fmt.Errorf("open blob %s: registry storage cannot open blobs by digest", d)
	}
	rc, err := opener.Open(ctx, d)
	if errors.Is(err, distribution.ErrBlobUnknown) {
		return nil, fmt.Errorf("open blob %s: %w: no such blob in the registry", d, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", d, mapNotFound(err))
	}
	return rc, nil
}
