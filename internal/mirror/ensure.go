package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/registry"
)

const (
	// maxIndexDepth bounds index-in-index nesting so a hostile upstream
	// cannot make Ensure recurse without end.
	maxIndexDepth = 4
	// parallelBlobs is how many blobs download at once, as Docker does.
	parallelBlobs = 3
	// blobAttempts bounds tries per blob when the connection drops.
	blobAttempts = 3
	// progressStep is how many bytes pass between progress reports.
	progressStep = 1 << 20
	// cancelGrace bounds how long the last canceled caller waits for the
	// copy to clean up.
	cancelGrace = 5 * time.Second
)

// Ensure makes the pinned image pullable from kiln's registry as
// p.LocalRepo@p.Digest, copying from the upstream registry what the store
// lacks: the manifest (for an index: the index and its children for
// Config.Platforms), the config and the layers. Blobs the store already
// holds under any repository are linked, not downloaded; an image already
// complete locally needs no network at all. Every blob is verified against
// its digest while it streams to disk. Then, for a pin of a tag, the local
// tag is set so the next Resolve without pull answers locally.
//
// progress, if not nil, is called with the bytes downloaded so far and the
// bytes to download in total (blobs not yet held); done can go back when a
// dropped download is retried. Calls are serialized and must return
// quickly: the download waits for them. Concurrent Ensure calls for the same image
// share one copy; each returns when it is done or its own ctx ends, and
// the copy stops once every caller gave up.
func (m *Mirror) Ensure(ctx context.Context, p Pinned, progress func(done, total int64)) error {
	return m.EnsureFor(ctx, p, nil, progress)
}

// EnsureFor is Ensure for a build of platforms: of an index it copies
// their children as well as the configured platforms' (a multi-platform
// build needs each of its platforms' base image).
func (m *Mirror) EnsureFor(ctx context.Context, p Pinned, platforms []string, progress func(done, total int64)) error {
	plats := slices.Clone(m.platforms)
	for _, s := range platforms {
		q, err := parsePlatform(s)
		if err != nil {
			return fmt.Errorf("mirror %s: %w", p.Upstream, err)
		}
		if !slices.Contains(plats, q) {
			plats = append(plats, q)
		}
	}
	img, err := parseImage(p.Upstream)
	if err != nil {
		return fmt.Errorf("mirror image: %w", err)
	}
	d, err := digest.Parse(p.Digest)
	if err != nil {
		return fmt.Errorf("mirror %s: pinned digest %q is invalid: %w", p.Upstream, p.Digest, err)
	}
	if p.LocalRepo != img.local || (img.digest != "" && img.digest != d) {
		return fmt.Errorf("mirror %s: pin is inconsistent (local repository %q, digest %s); resolve the reference again", p.Upstream, p.LocalRepo, d)
	}
	if err := m.join(ctx, img, d, plats, progress); err != nil {
		return fmt.Errorf("mirror %s@%s: %w", img.named.Name(), d, err)
	}
	if img.digest != "" {
		return nil // a digest reference names no tag to keep
	}
	cur, err := m.store.Resolve(ctx, img.local, img.tag)
	switch {
	case err == nil && (cur == d.String() || !p.FromUpstream):
		return nil
	case err != nil && !errors.Is(err, registry.ErrNotFound):
		return fmt.Errorf("mirror %s: read local tag: %w", p.Upstream, err)
	}
	if err := m.store.Tag(ctx, img.local, d.String(), img.local, img.tag); err != nil {
		return fmt.Errorf("mirror %s: set local tag: %w", p.Upstream, err)
	}
	return nil
}

// flight is one in-process copy of one image, shared by every Ensure that
// asks for it while it runs.
type flight struct {
	done    chan struct{}
	err     error
	cancel  context.CancelFunc
	waiters int // guarded by Mirror.mu

	mu       sync.Mutex
	watchers map[int]func(done, total int64)
	nextID   int
	bytes    int64
	total    int64
	reported int64
}

func (f *flight) watch(fn func(done, total int64)) (unwatch func()) {
	if fn == nil {
		return func() {}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	id := f.nextID
	f.nextID++
	f.watchers[id] = fn
	if f.total > 0 {
		fn(f.bytes, f.total) // a late joiner sees where the copy is
	}
	return func() {
		f.mu.Lock()
		delete(f.watchers, id)
		f.mu.Unlock()
	}
}

// start announces the bytes to download.
func (f *flight) start(total int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.total = total
	f.notify()
}

// add counts downloaded bytes (negative when a retry starts a blob over)
// and reports every progressStep bytes and at the end.
func (f *flight) add(n int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bytes += n
	if f.bytes-f.reported >= progressStep || f.bytes < f.reported || f.bytes == f.total {
		f.notify()
	}
}

func (f *flight) notify() {
	f.reported = f.bytes
	for _, fn := range f.watchers {
		fn(f.bytes, f.total)
	}
}

// join runs or joins the copy of img@d and waits for it or for ctx.
func (m *Mirror) join(ctx context.Context, img image, d digest.Digest, plats []platform, progress func(done, total int64)) error {
	// A copy for other platforms copies other children: its own flight.
	key := img.local + "@" + d.String() + " " + platformList(plats)
	m.mu.Lock()
	f := m.flights[key]
	if f == nil {
		// The copy belongs to all its callers, so it is not bound to the
		// first one's ctx; it stops when the last caller leaves.
		work, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel, watchers: map[int]func(int64, int64){}}
		m.flights[key] = f
		go func() {
			f.err = m.copyImage(work, img, d, plats, f)
			cancel()
			m.mu.Lock()
			if m.flights[key] == f {
				delete(m.flights, key)
			}
			m.mu.Unlock()
			close(f.done)
		}()
	}
	f.waiters++
	m.mu.Unlock()
	unwatch := f.watch(progress)
	defer unwatch()

	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		m.mu.Lock()
		f.waiters--
		last := f.waiters == 0
		if last {
			f.cancel()
			// A caller arriving now starts afresh instead of joining a
			// copy that is winding down.
			if m.flights[key] == f {
				delete(m.flights, key)
			}
		}
		m.mu.Unlock()
		if last {
			// The last caller leaves only once partial uploads are gone;
			// a canceled copy stops at its next read.
			select {
			case <-f.done:
			case <-time.After(cancelGrace):
			}
		}
		return fmt.Errorf("canceled: %w", ctx.Err())
	}
}

// plan is what a copy must store, children before parents.
type plan struct {
	platforms []platform // the index children to keep
	manifests []manifestItem
	blobs     []v1.Descriptor
	seen      map[digest.Digest]bool
}

type manifestItem struct {
	digest    digest.Digest
	mediaType string
	body      []byte
}

// copyImage copies img@root into the local store: it reads every manifest
// first (so the total size is known), then downloads the missing blobs,
// then stores the manifests bottom-up so a manifest never lands before
// what it references.
func (m *Mirror) copyImage(ctx context.Context, img image, root digest.Digest, plats []platform, f *flight) error {
	started := time.Now()
	// The upstream is only looked at when something is missing locally.
	getUp := func() *upstream { return m.upstream(img.host) }
	p := &plan{seen: map[digest.Digest]bool{}, platforms: plats}
	if err := m.walk(ctx, img, root, 0, p, getUp); err != nil {
		return err
	}

	var need []v1.Descriptor
	var total int64
	for _, b := range p.blobs {
		ok, err := m.store.LinkBlob(ctx, img.local, b.Digest.String())
		if err != nil {
			return err
		}
		if !ok {
			need = append(need, b)
			total += b.Size
		}
	}
	f.start(total)
	if len(need) > 0 {
		if err := m.fetchBlobs(ctx, getUp(), img, need, f); err != nil {
			return err
		}
	}
	for _, mf := range p.manifests {
		if _, err := m.store.PutManifest(ctx, img.local, mf.mediaType, mf.body, ""); err != nil {
			return err
		}
	}
	if len(p.manifests) > 0 || len(need) > 0 {
		m.log.Info("mirrored base image", "image", img.named.Name(), "digest", root,
			"local", img.local, "manifests", len(p.manifests), "blobs_downloaded", len(need),
			"bytes_downloaded", total, "duration", time.Since(started).Round(time.Millisecond))
	}
	return nil
}

// walk adds manifest d and everything below it that the store lacks to p.
// A manifest already stored needs nothing: the store accepts an image
// manifest only after its blobs. A stored index still has its children
// checked, since only some platforms are kept.
func (m *Mirror) walk(ctx context.Context, img image, d digest.Digest, depth int, p *plan, getUp func() *upstream) error {
	if p.seen[d] {
		return nil
	}
	p.seen[d] = true
	if depth > maxIndexDepth {
		return fmt.Errorf("manifest %s: indexes nested deeper than %d levels", d, maxIndexDepth)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	var (
		body      []byte
		mediaType string
	)
	present, err := m.store.HasManifest(ctx, img.local, d.String())
	if err != nil {
		return err
	}
	if present {
		mediaType, body, _, err = m.store.Manifest(ctx, img.local, d.String())
		if err != nil {
			return err
		}
		if !isIndex(mediaType) {
			return nil
		}
	} else {
		body, mediaType, _, err = getUp().getManifest(ctx, img.path, d.String())
		if err != nil {
			return err
		}
	}

	if isIndex(mediaType) {
		var idx v1.Index
		if err := json.Unmarshal(body, &idx); err != nil {
			return fmt.Errorf("manifest %s: decode index: %w", d, err)
		}
		children := selectChildren(idx.Manifests, p.platforms)
		if len(children) == 0 {
			return fmt.Errorf("%w: image %s offers no manifest for %s (it has: %s); add a platform it has to the mirror's platforms if that is what builds need",
				ErrNotFound, d, platformList(p.platforms), offeredPlatforms(idx.Manifests))
		}
		for _, c := range children {
			if err := m.walk(ctx, img, c.Digest, depth+1, p, getUp); err != nil {
				return err
			}
		}
	} else {
		var man v1.Manifest
		if err := json.Unmarshal(body, &man); err != nil {
			return fmt.Errorf("manifest %s: decode: %w", d, err)
		}
		for _, b := range append([]v1.Descriptor{man.Config}, man.Layers...) {
			if err := b.Digest.Validate(); err != nil {
				return fmt.Errorf("manifest %s: blob digest %q: %w", d, b.Digest, err)
			}
			if len(b.URLs) > 0 {
				return fmt.Errorf("manifest %s: layer %s is a foreign layer served from %s; kiln does not mirror foreign (Windows) layers", d, b.Digest, b.URLs[0])
			}
			if b.Size < 0 {
				return fmt.Errorf("manifest %s: blob %s has negative size %d", d, b.Digest, b.Size)
			}
			if !slices.ContainsFunc(p.blobs, func(x v1.Descriptor) bool { return x.Digest == b.Digest }) {
				p.blobs = append(p.blobs, b)
			}
		}
	}
	if !present {
		p.manifests = append(p.manifests, manifestItem{digest: d, mediaType: mediaType, body: body})
	}
	return nil
}

func isIndex(mediaType string) bool {
	return mediaType == v1.MediaTypeImageIndex || mediaType == mediaTypeDockerList
}

// selectChildren keeps the children of an index for platforms. Nested
// indexes and children without a platform are kept, since nothing says
// they are for another platform.
func selectChildren(all []v1.Descriptor, platforms []platform) []v1.Descriptor {
	var out []v1.Descriptor
	for _, c := range all {
		if isIndex(c.MediaType) || c.Platform == nil {
			out = append(out, c)
			continue
		}
		for _, want := range platforms {
			if want.matches(c.Platform) {
				out = append(out, c)
				break
			}
		}
	}
	return out
}

func platformList(platforms []platform) string {
	s := make([]string, len(platforms))
	for i, p := range platforms {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func offeredPlatforms(all []v1.Descriptor) string {
	var s []string
	for _, c := range all {
		if c.Platform != nil {
			s = append(s, platformOf(c.Platform).String())
		}
	}
	if len(s) == 0 {
		return "no platforms"
	}
	return strings.Join(s, ", ")
}

// fetchBlobs downloads blobs a few at a time; the first failure stops the
// rest.
func (m *Mirror) fetchBlobs(ctx context.Context, u *upstream, img image, blobs []v1.Descriptor, f *flight) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan v1.Descriptor)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range min(parallelBlobs, len(blobs)) {
		wg.Go(func() {
			for b := range work {
				if err := m.fetchBlob(ctx, u, img, b, f); err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
				}
			}
		})
	}
feed:
	for _, b := range blobs {
		select {
		case work <- b:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// fetchBlob streams blob b from upstream into the store, retrying a
// dropped connection; a refusal or a digest mismatch is final.
func (m *Mirror) fetchBlob(ctx context.Context, u *upstream, img image, b v1.Descriptor, f *flight) error {
	for attempt := 1; ; attempt++ {
		var sent int64
		err := func() error {
			body, err := u.openBlob(ctx, img.path, b.Digest)
			if err != nil {
				return err
			}
			defer body.Close()
			cr := &countingReader{r: body, add: func(n int64) { sent += n; f.add(n) }}
			return m.store.PutBlob(ctx, img.local, b.Digest.String(), b.Size, cr)
		}()
		if err == nil {
			return nil
		}
		f.add(-sent)
		var final *statusError
		switch {
		case errors.Is(err, ErrDigestMismatch):
			return fmt.Errorf("blob %s from %s: %w; the upstream registry or something between it and kiln corrupted the content", b.Digest, u.host, err)
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &final) || attempt == blobAttempts:
			return fmt.Errorf("blob %s: %w", b.Digest, err)
		}
		m.log.Warn("blob download failed, retrying", "image", img.named.Name(), "blob", b.Digest, "attempt", attempt, "err", err)
		select {
		case <-time.After(time.Duration(attempt) * time.Second):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

type countingReader struct {
	r   io.Reader
	add func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.add(int64(n))
	}
	return n, err
}
