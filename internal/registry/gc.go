package registry

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path/filepath"
	"time"

	"github.com/distribution/distribution/v3/registry/storage"
)

// GCStats is what one garbage collection did.
type GCStats struct {
	BlobsBefore, BlobsAfter int
	BytesBefore, BytesAfter int64
	Took                    time.Duration
}

// GC deletes every blob no manifest of any repository references (layers
// of deleted images, leftovers of failed pushes). Distribution's mark and
// sweep is only safe while nothing is pushed: while it runs, pushes to the
// HTTP API are answered 503 (clients retry), and the caller must make sure
// no build is between uploading its blobs and its manifest, which this
// process's own pushes are (see builds.Service.Pause).
func (r *Registry) GC(ctx context.Context) (GCStats, error) {
	r.writes.Lock()
	defer r.writes.Unlock()
	start := time.Now()
	var st GCStats
	var err error
	if st.BlobsBefore, st.BytesBefore, err = r.blobUsage(); err != nil {
		return st, err
	}
	if err := storage.MarkAndSweep(ctx, r.driver, r.ns, storage.GCOpts{Quiet: true}); err != nil {
		return st, fmt.Errorf("registry garbage collection: %w", err)
	}
	if st.BlobsAfter, st.BytesAfter, err = r.blobUsage(); err != nil {
		return st, err
	}
	st.Took = time.Since(start)
	return st, nil
}

// blobUsage counts the blobs on disk and their bytes.
func (r *Registry) blobUsage() (n int, bytes int64, err error) {
	root := filepath.Join(r.root, "docker", "registry", "v2", "blobs")
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == root && errors.Is(err, fs.ErrNotExist) {
				return fs.SkipDir
			}
			return err
		}
		if d.Type().IsRegular() && d.Name() == "data" {
			info, err := d.Info()
			if err != nil {
				return err
			}
			n++
			bytes += info.Size()
		}
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("measure registry blobs: %w", err)
	}
	return n, bytes, nil
}

// mutating reports whether req may write to the registry's storage.
func mutating(req *http.Request) bool {
	return req.Method != http.MethodGet && req.Method != http.MethodHead && req.Method != http.MethodOptions
}
