package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/buildcontext"
)

// errUploadStopped unblocks the packer when the request ended before the
// whole body was read (the server answered early, or the client gave up).
var errUploadStopped = errors.New("upload stopped")

// upload sends the build request as a multipart body produced on the fly:
// the packer writes into an io.Pipe that the HTTP request reads, so the
// context is never held in memory, whatever its size. Fields go first, then
// secrets, then the context, as the API asks.
func upload(ctx context.Context, c *client, form *buildForm, mode string, stdout, stderr io.Writer) (*api.Build, error) {
	var bar *uploadBar
	if mode == progressTTY {
		bar = startUploadBar(ctx, stdout, form)
	}

	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	var stats buildcontext.PackStats
	packed := make(chan error, 1)
	go func() {
		var err error
		stats, err = writeForm(ctx, mw, form, bar, stderr)
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err) // nil: the reader sees EOF
		packed <- err
	}()

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("/v1/builds"), pr)
	if err != nil {
		pr.Close()
		<-packed
		return nil, fmt.Errorf("submit build: %w", err)
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Accept", "application/json")
	c.authorize(req)
	resp, doErr := c.http.Do(req)
	pr.CloseWithError(errUploadStopped)
	packErr := <-packed
	if resp != nil {
		defer resp.Body.Close()
	}
	if bar != nil {
		bar.stop(packErr == nil && doErr == nil && resp.StatusCode < 300, stats)
	}

	// A pack error caused by the request ending (the pipe closed under the
	// packer) says nothing; the server's answer or the transport error does.
	packFailed := packErr != nil && !errors.Is(packErr, errUploadStopped) && !errors.Is(packErr, io.ErrClosedPipe)
	switch {
	case ctx.Err() != nil:
		return nil, interrupted("upload interrupted; no build was started")
	case packFailed:
		return nil, fmt.Errorf("pack build context %s: %w", form.dir, packErr)
	case resp != nil && resp.StatusCode >= 300:
		return nil, c.readError(resp)
	case doErr != nil:
		return nil, c.transportError(ctx, "submit build", doErr)
	}
	var b api.Build
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&b); err != nil {
		return nil, fmt.Errorf("submit build: the server answered %d with an unreadable build: %w", resp.StatusCode, err)
	}
	if mode == progressPlain {
		fmt.Fprintf(stdout, "#0 sent build context: %d files, %s (%s compressed)\n", stats.Files, humanSize(stats.Bytes), humanSize(stats.Written))
	}
	return &b, nil
}

func writeForm(ctx context.Context, mw *multipart.Writer, form *buildForm, bar *uploadBar, stderr io.Writer) (buildcontext.PackStats, error) {
	for _, f := range form.fields {
		if err := mw.WriteField(f.name, f.value); err != nil {
			return buildcontext.PackStats{}, err
		}
	}
	for _, s := range form.secrets {
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="secret"; filename="%s"`, quoteEscaper.Replace(s.id)))
		h.Set("Content-Type", "application/octet-stream")
		w, err := mw.CreatePart(h)
		if err != nil {
			return buildcontext.PackStats{}, err
		}
		if _, err := w.Write(s.value); err != nil {
			return buildcontext.PackStats{}, err
		}
	}
	h := textproto.MIMEHeader{}
	h.Set("Content-Disposition", `form-data; name="context"; filename="context.tar.zst"`)
	h.Set("Content-Type", "application/zstd")
	w, err := mw.CreatePart(h)
	if err != nil {
		return buildcontext.PackStats{}, err
	}
	opt := buildcontext.PackOptions{
		Dockerfile: form.dockerfile,
		// zstd keeps up with a fast link at little CPU; the server reads it.
		Compression: buildcontext.Zstd,
		Warn:        func(msg string) { fmt.Fprintf(stderr, "kiln: warning: %s\n", msg) },
	}
	if bar != nil {
		opt.Progress = bar.progress
	}
	return buildcontext.Pack(ctx, form.dir, w, opt)
}

var quoteEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`)

// uploadBar is the one-line upload progress shown on a terminal: files,
// bytes and the percentage of the total that a concurrent Scan finds.
type uploadBar struct {
	out       io.Writer
	files     atomic.Int64
	bytes     atomic.Int64
	total     atomic.Int64 // -1 until Scan is done
	start     time.Time
	done      chan struct{}
	wg        sync.WaitGroup
	cancelScn context.CancelFunc
}

func startUploadBar(ctx context.Context, out io.Writer, form *buildForm) *uploadBar {
	b := &uploadBar{out: out, start: time.Now(), done: make(chan struct{})}
	b.total.Store(-1)
	sctx, cancel := context.WithCancel(ctx)
	b.cancelScn = cancel
	b.wg.Add(2)
	go func() {
		defer b.wg.Done()
		// Scanning walks the tree without reading contents, so it usually
		// finishes long before the upload and the bar gets a percentage.
		if _, n, err := buildcontext.Scan(sctx, form.dir, buildcontext.PackOptions{Dockerfile: form.dockerfile}); err == nil {
			b.total.Store(n)
		}
	}()
	go func() {
		defer b.wg.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-b.done:
				return
			case <-t.C:
				b.draw(false)
			}
		}
	}()
	return b
}

func (b *uploadBar) progress(files int, bytes int64) {
	b.files.Store(int64(files))
	b.bytes.Store(bytes)
}

func (b *uploadBar) draw(final bool) {
	line := fmt.Sprintf("[+] Sending build context: %d files, %s", b.files.Load(), humanSize(b.bytes.Load()))
	if t := b.total.Load(); t > 0 {
		pct := min(100, b.bytes.Load()*100/t)
		if final {
			pct = 100
		}
		line += fmt.Sprintf(" / %s (%d%%)", humanSize(t), pct)
	}
	line += "  " + seconds(time.Since(b.start))
	end := ""
	if final {
		end = "\n"
	}
	fmt.Fprintf(b.out, "\r\x1b[2K%s%s", line, end)
}

// stop ends the bar; ok draws the final totals, otherwise the line is
// cleared for the error that follows.
func (b *uploadBar) stop(ok bool, stats buildcontext.PackStats) {
	close(b.done)
	b.cancelScn()
	b.wg.Wait()
	if !ok {
		fmt.Fprint(b.out, "\r\x1b[2K")
		return
	}
	b.progress(stats.Files, stats.Bytes)
	b.draw(true)
}
