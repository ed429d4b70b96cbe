package registry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"time"

	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
)

// GCStats is what one garbage collection did.
type GCStats struct {
	BlobsBefore, BlobsAfter int
	BytesBefore, BytesAfter int64
	// UploadsRemoved counts the abandoned upload sessions deleted.
	UploadsRemoved int
	Took           time.Duration
}

// uploadMaxAge is how long an upload session of this process may stay
// unfinished before GC deletes it, as the background purger does.
const uploadMaxAge = 24 * time.Hour

// GC deletes every blob no manifest of any repository references (layers
// of deleted images, leftovers of failed pushes), and every upload session
// no client will finish: those begun before this Registry was created
// (upload state is signed with a per-process secret, so a crash or restart
// strands them) or more than a day ago. Distribution's mark and sweep is
// only safe while nothing is pushed: while it runs, pushes to the HTTP API
// are answered 503 (clients retry), and the caller must make sure no build
// is between uploading its blobs and its manifest, which this process's
// own pushes are (see builds.Service.Pause).
func (r *Registry) GC(ctx context.Context) (GCStats, error) {
	release, err := r.writes.Exclusive(ctx)
	if err != nil {
		return GCStats{}, fmt.Errorf("registry garbage collection: wait for writes to finish: %w", err)
	}
	defer release()
	start := time.Now()
	var st GCStats
	if st.BlobsBefore, st.BytesBefore, err = r.blobUsage(ctx); err != nil {
		return st, err
	}
	// An upload that cannot be purged does not hold up collecting blobs;
	// it is reported once the rest is done.
	removed, purgeErr := r.purgeUploads(ctx, start)
	st.UploadsRemoved = removed
	// Mark and sweep fails on a registry that never stored a blob; such a
	// registry has nothing to sweep.
	if ok, err := r.exists(ctx, storageDir("blobs")); err != nil {
		return st, fmt.Errorf("registry garbage collection: %w", err)
	} else if ok {
		if err := storage.MarkAndSweep(ctx, r.driver, r.ns, storage.GCOpts{Quiet: true}); err != nil {
			return st, fmt.Errorf("registry garbage collection: %w", err)
		}
	}
	if st.BlobsAfter, st.BytesAfter, err = r.blobUsage(ctx); err != nil {
		return st, err
	}
	st.Took = time.Since(start)
	return st, purgeErr
}

// purgeUploads deletes the upload sessions begun before
// max(r.started, now-uploadMaxAge) and returns how many it deleted. The
// caller holds r.writes exclusively.
func (r *Registry) purgeUploads(ctx context.Context, now time.Time) (int, error) {
	// PurgeUploads walks the repositories, and fails on a registry that
	// has none yet.
	if ok, err := r.exists(ctx, storageDir("repositories")); err != nil {
		return 0, fmt.Errorf("registry garbage collection: %w", err)
	} else if !ok {
		return 0, nil
	}
	cutoff := now.Add(-uploadMaxAge)
	if r.started.After(cutoff) {
		cutoff = r.started
	}
	// An upload's start is stored with whole seconds (RFC 3339), so one
	// begun in the same second as cutoff may be this process's own: keep it.
	cutoff = cutoff.Truncate(time.Second)
	removed, errs := storage.PurgeUploads(ctx, r.driver, cutoff, true)
	if len(errs) > 0 {
		return len(removed), fmt.Errorf("registry garbage collection: removed %d abandoned uploads, but could not inspect or remove others: %w", len(removed), errors.Join(errs...))
	}
	return len(removed), nil
}

// storageDir is a top-level directory of distribution's storage layout,
// "blobs" or "repositories", as a storage driver path.
func storageDir(name string) string {
	return "/docker/registry/v2/" + name
}

// exists reports whether p is in storage: a file, or on the filesystem a
// directory, or on S3 a prefix of at least one object.
func (r *Registry) exists(ctx context.Context, p string) (bool, error) {
	_, err := r.driver.Stat(ctx, p)
	switch {
	case err == nil:
		return true, nil
	case isMissing(err):
		return false, nil
	}
	return false, err
}

// blobUsage counts the stored blobs and their bytes, with one listing of
// the blob store (on S3, a few list requests per thousand blobs).
func (r *Registry) blobUsage(ctx context.Context) (n int, bytes int64, err error) {
	err = r.driver.Walk(ctx, storageDir("blobs"), func(fi storagedriver.FileInfo) error {
		if !fi.IsDir() && path.Base(fi.Path()) == "data" {
			n++
			bytes += fi.Size()
		}
		return nil
	})
	if isMissing(err) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("measure registry blobs: %w", err)
	}
	return n, bytes, nil
}

// mutating reports whether req may write to the registry's storage.
func mutating(req *http.Request) bool {
	return req.Method != http.MethodGet && req.Method != http.MethodHead && req.Method != http.MethodOptions
}
