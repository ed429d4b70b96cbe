package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/buildcontext"
)

// --context-upload values.
const (
	contextUploadAuto     = "auto"
	contextUploadManifest = "manifest"
	contextUploadTar      = "tar"
)

const (
	// maxQueryDigests is the most digests the server takes in one query.
	maxQueryDigests = 100000
	// maxBlobBatch bounds one blob upload request, so that a failure
	// costs at most this much to send again and a server's size limit on
	// a request is far away. A larger single file goes alone.
	maxBlobBatch = 256 << 20
	// maxQueryAnswer bounds the JSON of a query's answer: every digest
	// asked for, quoted, with room to spare.
	maxQueryAnswer = 16 << 20
)

// errNoContentStore: the server cannot take a context by content (an older
// kiln, or one configured without a context store); only a tar will do.
var errNoContentStore = errors.New("the kiln server keeps no context store")

// manifestUpload is one build's content-addressed context upload: hash
// the context, send the contents the server lacks, submit the build with
// the manifest.
type manifestUpload struct {
	c      *client
	form   *buildForm
	mode   string
	out    io.Writer // progress
	stderr io.Writer
	start  time.Time

	manifest []byte                 // the JSON sent in context_manifest
	digests  []string               // distinct file contents, in manifest order
	users    map[string]int         // digest -> how many entries have it
	sources  buildcontext.Sources   // where to read each digest
	stats    buildcontext.PackStats // of the manifest
	sent     int64                  // content bytes uploaded
	uploaded map[string]bool
}

func uploadManifest(ctx context.Context, c *client, form *buildForm, mode string, stdout, stderr io.Writer) (*api.Build, error) {
	u := &manifestUpload{c: c, form: form, mode: mode, out: stdout, stderr: stderr, start: time.Now(), uploaded: map[string]bool{}}
	if err := u.hash(ctx); err != nil {
		return nil, err
	}
	if err := u.sendMissing(ctx); err != nil {
		return nil, err
	}
	b, err := u.submit(ctx)
	if isMissingBlobs(err) {
		// The store evicted something between our query and the submit:
		// ask again, send what is gone, and try once more.
		debugf(stderr, "%v; sending the missing contents again", err)
		if err := u.sendMissing(ctx); err != nil {
			return nil, err
		}
		b, err = u.submit(ctx)
	}
	if err != nil {
		return nil, err
	}
	u.report()
	return b, nil
}

// hash builds the manifest. An empty query runs alongside, so that a
// server that cannot take a manifest, or a wrong token, is found out
// without first hashing a large context.
func (u *manifestUpload) hash(ctx context.Context) error {
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	probed := make(chan error, 1)
	go func() {
		_, err := u.c.queryBlobs(hctx, []string{})
		if err != nil {
			cancel()
		}
		probed <- err
	}()

	var bar *uploadBar
	if u.mode == progressTTY {
		bar = startBar(hctx, u.out, "Hashing build context", scanTotal(u.form))
	}
	cache := u.openCache()
	opt := packOptions(u.form, u.stderr)
	// Held back until hashing succeeded: if the server wants a tar after
	// all, Pack warns again.
	var warnings []string
	opt.Warn = func(msg string) { warnings = append(warnings, msg) }
	if bar != nil {
		opt.Progress = bar.progress
	}
	m, src, stats, err := buildcontext.BuildManifest(hctx, u.form.dir, opt, cache)
	probeErr := <-probed
	if bar != nil {
		bar.stop(false, stats) // the summary comes when the upload is done
	}
	switch {
	case ctx.Err() != nil:
		return interrupted("upload interrupted; no build was started")
	case probeErr != nil:
		return probeErr
	case err != nil:
		return fmt.Errorf("hash build context %s: %w", u.form.dir, err)
	}
	for _, w := range warnings {
		fmt.Fprintf(u.stderr, "kiln: warning: %s\n", w)
	}
	if cache != nil {
		if err := cache.Save(); err != nil {
			debugf(u.stderr, "%v; the next build hashes the context again", err)
		}
	}

	u.manifest, err = json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode the context manifest: %w", err)
	}
	u.sources, u.stats, u.users = src, stats, map[string]int{}
	for _, e := range m.Entries {
		if e.Type != buildcontext.EntryFile {
			continue
		}
		if u.users[e.Digest] == 0 {
			u.digests = append(u.digests, e.Digest)
		}
		u.users[e.Digest]++
	}
	return nil
}

// openCache opens the context's hash cache; without one every file is
// hashed, which is slower but as correct.
func (u *manifestUpload) openCache() *buildcontext.HashCache {
	cache, err := buildcontext.OpenHashCache(u.form.dir)
	if err != nil {
		debugf(u.stderr, "%v; hashing without a cache", err)
		return nil
	}
	return cache
}

// sendMissing asks which contents the server lacks and uploads them, in
// requests of at most maxBlobBatch bytes.
func (u *manifestUpload) sendMissing(ctx context.Context) error {
	missing, err := u.c.missingBlobs(ctx, u.digests)
	if err != nil {
		return err
	}
	var total int64
	for _, d := range missing {
		total += u.sources[d].Size
	}
	var bar *uploadBar
	if u.mode == progressTTY && len(missing) > 0 {
		bar = startBar(ctx, u.out, "Sending changed files", func(context.Context) (int64, error) { return total, nil })
		defer bar.stop(false, buildcontext.PackStats{})
	}
	var files int
	var done int64
	for _, batch := range blobBatches(missing, u.sources, maxBlobBatch) {
		var progress func(int64)
		if bar != nil {
			base := done
			progress = func(n int64) { bar.progress(files, base+n) }
		}
		n, err := u.c.putBlobs(ctx, batch, u.sources, progress)
		if err != nil {
			return err
		}
		done += n
		files += len(batch)
		u.sent += n
		for _, d := range batch {
			u.uploaded[d] = true
		}
	}
	return nil
}

// blobBatches splits digests, in order, into groups of at most limit
// content bytes (a larger blob makes a group of its own).
func blobBatches(digests []string, src buildcontext.Sources, limit int64) [][]string {
	var out [][]string
	var cur []string
	var size int64
	for _, d := range digests {
		n := src[d].Size
		if len(cur) > 0 && size+n > limit {
			out = append(out, cur)
			cur, size = nil, 0
		}
		cur = append(cur, d)
		size += n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// submit posts the build with the manifest in place of the context.
func (u *manifestUpload) submit(ctx context.Context) (*api.Build, error) {
	resp, writeErr, doErr := sendForm(ctx, u.c, u.form, func(mw *multipart.Writer) error {
		w, err := createFilePart(mw, "context_manifest", "manifest.json", "application/json")
		if err != nil {
			return err
		}
		_, err = w.Write(u.manifest)
		return err
	})
	if resp != nil {
		defer resp.Body.Close()
	}
	if err := submitError(ctx, u.c, "send the context manifest", resp, writeErr, doErr); err != nil {
		return nil, err
	}
	return decodeBuild(resp)
}

func isMissingBlobs(err error) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.Status == http.StatusConflict && ae.Code == "missing_blobs"
}

// report prints "context: 3003 files, 295 MiB; sent 100 KiB (3002 unchanged)".
func (u *manifestUpload) report() {
	changed := 0
	for d := range u.uploaded {
		changed += u.users[d]
	}
	line := fmt.Sprintf("context: %d files, %s; sent %s (%d unchanged)", u.stats.Files, humanSize(u.stats.Bytes), humanSize(u.sent), u.stats.Files-changed)
	switch u.mode {
	case progressPlain:
		fmt.Fprintf(u.out, "#0 %s\n", line)
	case progressTTY:
		fmt.Fprintf(u.out, "\r\x1b[2K[+] %s  %s\n", line, seconds(time.Since(u.start)))
	default:
		// Standard output carries machine-readable events.
		fmt.Fprintf(u.stderr, "%s\n", line)
	}
}

type blobQuery struct {
	Digests []string `json:"digests"`
}

type blobQueryResult struct {
	Missing []string `json:"missing"`
}

type blobUploadResult struct {
	Stored int64 `json:"stored"`
	Bytes  int64 `json:"bytes"`
}

// missingBlobs asks, in batches, which of digests the server lacks, and
// returns them in the order given. Answers naming anything not asked
// for are ignored.
func (c *client) missingBlobs(ctx context.Context, digests []string) ([]string, error) {
	missing := map[string]bool{}
	for start := 0; start < len(digests); start += maxQueryDigests {
		got, err := c.queryBlobs(ctx, digests[start:min(start+maxQueryDigests, len(digests))])
		if err != nil {
			return nil, err
		}
		for _, d := range got {
			missing[d] = true
		}
	}
	var out []string
	for _, d := range digests {
		if missing[d] {
			out = append(out, d)
		}
	}
	return out, nil
}

// queryBlobs is one POST /v1/contexts/blobs/query. A 404 means the server
// has no context store: errNoContentStore.
func (c *client) queryBlobs(ctx context.Context, digests []string) ([]string, error) {
	const what = "ask the kiln server which context files it has"
	body, err := json.Marshal(blobQuery{Digests: digests})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("/v1/contexts/blobs/query"), bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	c.authorize(req)
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, interrupted("upload interrupted; no build was started")
		}
		return nil, c.transportError(ctx, what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil, fmt.Errorf("%w (it answered 404 to POST /v1/contexts/blobs/query)", errNoContentStore)
	}
	if resp.StatusCode >= 300 {
		return nil, c.readError(resp)
	}
	var r blobQueryResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxQueryAnswer)).Decode(&r); err != nil {
		return nil, fmt.Errorf("%s: the server answered %d with an unreadable list: %w", what, resp.StatusCode, err)
	}
	return r.Missing, nil
}

// putBlobs uploads the contents named by digests as one tar, written while
// it is sent, and returns the content bytes sent. progress receives the
// running total.
func (c *client) putBlobs(ctx context.Context, digests []string, src buildcontext.Sources, progress func(int64)) (int64, error) {
	const what = "upload context files"
	var sent int64
	pr, pw := io.Pipe()
	written := make(chan error, 1)
	go func() {
		err := buildcontext.WriteBlobs(ctx, pw, digests, src, func(n int64) {
			sent = n
			if progress != nil {
				progress(n)
			}
		})
		pw.CloseWithError(err)
		written <- err
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("/v1/contexts/blobs"), pr)
	if err != nil {
		pr.Close()
		<-written
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	req.Header.Set("Content-Type", "application/x-tar")
	req.Header.Set("Accept", "application/json")
	c.authorize(req)
	resp, doErr := c.http.Do(req)
	pr.CloseWithError(errUploadStopped)
	writeErr := <-written
	if resp != nil {
		defer resp.Body.Close()
	}
	writeFailed := writeErr != nil && !errors.Is(writeErr, errUploadStopped) && !errors.Is(writeErr, io.ErrClosedPipe)
	switch {
	case ctx.Err() != nil:
		return 0, interrupted("upload interrupted; no build was started")
	case writeFailed:
		return 0, fmt.Errorf("%s: %w", what, writeErr)
	case resp != nil && resp.StatusCode >= 300:
		return 0, blobUploadError(c, resp)
	case doErr != nil:
		return 0, c.transportError(ctx, what, doErr)
	}
	var r blobUploadResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&r); err != nil {
		return 0, fmt.Errorf("%s: the server answered %d with an unreadable result: %w", what, resp.StatusCode, err)
	}
	return sent, nil
}

// blobUploadError keeps the server's reason and adds what to do about the
// refusals an upload can meet.
func blobUploadError(c *client, resp *http.Response) error {
	err := c.readError(resp)
	switch resp.StatusCode {
	case http.StatusRequestEntityTooLarge:
		return fmt.Errorf("upload context files: %w (the server refused the request as too large; shrink the context with .dockerignore or ask the server's operator about its limits)", err)
	case http.StatusTooManyRequests:
		return fmt.Errorf("upload context files: %w (the server is busy with other uploads; retry in a moment)", err)
	case http.StatusBadRequest:
		return fmt.Errorf("upload context files: %w (a file may have changed while it was sent; retry when nothing is writing to the context)", err)
	}
	return fmt.Errorf("upload context files: %w", err)
}

// debugf prints a note that only matters when chasing a problem: with
// KILN_DEBUG set.
func debugf(w io.Writer, format string, args ...any) {
	if os.Getenv("KILN_DEBUG") == "" {
		return
	}
	fmt.Fprintf(w, "kiln: debug: "+format+"\n", args...)
}
