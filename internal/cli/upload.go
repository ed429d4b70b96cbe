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

// upload sends the build request with its context, the way
// form.contextUpload says: by content (only the files the server lacks) or
// as one tar. In auto mode a server without a content store gets the tar.
func upload(ctx context.Context, c *client, form *buildForm, mode string, stdout, stderr io.Writer) (*api.Build, error) {
	switch {
	case form.raw != nil:
		return uploadRaw(ctx, c, form, mode, stdout)
	case form.kind == contextGit || form.kind == contextHTTP:
		// The server fetches it: nothing to send but the fields.
		resp, writeErr, doErr := sendForm(ctx, c, form, func(*multipart.Writer) error { return nil })
		if resp != nil {
			defer resp.Body.Close()
		}
		if err := submitError(ctx, c, "submit build", resp, writeErr, doErr); err != nil {
			return nil, err
		}
		return decodeBuild(resp)
	}
	if form.contextUpload == contextUploadTar {
		return uploadTar(ctx, c, form, mode, stdout, stderr)
	}
	b, err := uploadManifest(ctx, c, form, mode, stdout, stderr)
	if !errors.Is(err, errNoContentStore) {
		return b, err
	}
	if form.contextUpload == contextUploadManifest {
		return nil, fmt.Errorf("--context-upload=manifest: %w; use --context-upload=tar (or auto) with this server", err)
	}
	debugf(stderr, "%v; sending the whole context as a tar", err)
	return uploadTar(ctx, c, form, mode, stdout, stderr)
}

// uploadTar sends the whole context as a zstd tar in the "context" part,
// packed while it is sent.
func uploadTar(ctx context.Context, c *client, form *buildForm, mode string, stdout, stderr io.Writer) (*api.Build, error) {
	var bar *uploadBar
	if mode == progressTTY {
		bar = startUploadBar(ctx, stdout, form)
	}
	var stats buildcontext.PackStats
	resp, packErr, doErr := sendForm(ctx, c, form, func(mw *multipart.Writer) error {
		var err error
		stats, err = writeContextTar(ctx, mw, form, bar, stderr)
		return err
	})
	if resp != nil {
		defer resp.Body.Close()
	}
	if bar != nil {
		bar.stop(packErr == nil && doErr == nil && resp.StatusCode < 300, stats)
	}
	if err := submitError(ctx, c, "pack build context "+form.dir, resp, packErr, doErr); err != nil {
		return nil, err
	}
	b, err := decodeBuild(resp)
	if err != nil {
		return nil, err
	}
	if mode == progressPlain {
		fmt.Fprintf(stdout, "#0 sent build context: %d files, %s (%s compressed)\n", stats.Files, humanSize(stats.Bytes), humanSize(stats.Written))
	}
	return b, nil
}

// uploadRaw sends a context the user gave as a tar (on stdin or as a
// file), or the empty one, in the "context" part as it is: the server
// reads a tar, tar.gz or tar.zst and checks every entry.
func uploadRaw(ctx context.Context, c *client, form *buildForm, mode string, stdout io.Writer) (*api.Build, error) {
	r, closeRaw, err := form.raw.open()
	if err != nil {
		return nil, err
	}
	defer closeRaw()
	cr := &rawCounter{r: r}
	resp, writeErr, doErr := sendForm(ctx, c, form, func(mw *multipart.Writer) error {
		w, err := createFilePart(mw, "context", "context.tar", "application/octet-stream")
		if err != nil {
			return err
		}
		_, err = io.Copy(w, cr)
		return err
	})
	if resp != nil {
		defer resp.Body.Close()
	}
	if err := submitError(ctx, c, "send build context "+form.raw.name, resp, writeErr, doErr); err != nil {
		return nil, err
	}
	b, err := decodeBuild(resp)
	if err != nil {
		return nil, err
	}
	if mode == progressPlain {
		fmt.Fprintf(stdout, "#0 sent build context from %s: %s\n", form.raw.name, humanSize(cr.n.Load()))
	}
	return b, nil
}

type rawCounter struct {
	r io.Reader
	n atomic.Int64
}

func (c *rawCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// sendForm posts the build request as a multipart body produced on the fly:
// fields, then secrets, then the part contextPart writes, as the API asks.
// The writer feeds an io.Pipe that the HTTP request reads, so a context is
// never held in memory, whatever its size. writeErr is the writer's error,
// which is errUploadStopped or io.ErrClosedPipe when the request ended
// first; submitError sorts this out.
func sendForm(ctx context.Context, c *client, form *buildForm, contextPart func(*multipart.Writer) error) (resp *http.Response, writeErr, doErr error) {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	written := make(chan error, 1)
	go func() {
		err := writeFields(mw, form)
		if err == nil {
			err = writeNamedContexts(ctx, mw, form)
		}
		if err == nil {
			err = contextPart(mw)
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err) // nil: the reader sees EOF
		written <- err
	}()

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("/v1/builds"), pr)
	if err != nil {
		pr.Close()
		<-written
		return nil, nil, err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Accept", "application/json")
	c.authorize(req)
	resp, doErr = c.http.Do(req)
	pr.CloseWithError(errUploadStopped)
	return resp, <-written, doErr
}

// submitError explains a failed request whose body a goroutine wrote: an
// interrupt, the writer's own failure (what says what it was doing), the
// server's error answer, or the transport error; nil if none.
func submitError(ctx context.Context, c *client, what string, resp *http.Response, writeErr, doErr error) error {
	// A write error caused by the request ending (the pipe closed under
	// the writer) says nothing; the server's answer or the transport
	// error does.
	writeFailed := writeErr != nil && !errors.Is(writeErr, errUploadStopped) && !errors.Is(writeErr, io.ErrClosedPipe)
	switch {
	case ctx.Err() != nil:
		return interrupted("upload interrupted; no build was started")
	case writeFailed:
		return fmt.Errorf("%s: %w", what, writeErr)
	case resp != nil && resp.StatusCode >= 300:
		return c.readError(resp)
	case doErr != nil:
		return c.transportError(ctx, "submit build", doErr)
	}
	return nil
}

func decodeBuild(resp *http.Response) (*api.Build, error) {
	var b api.Build
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&b); err != nil {
		return nil, fmt.Errorf("submit build: the server answered %d with an unreadable build: %w", resp.StatusCode, err)
	}
	return &b, nil
}

// writeFields writes the form's fields and then its secrets and ssh key
// files.
func writeFields(mw *multipart.Writer, form *buildForm) error {
	for _, f := range form.fields {
		if err := mw.WriteField(f.name, f.value); err != nil {
			return err
		}
	}
	for _, part := range []struct {
		name    string
		secrets []secret
	}{{"secret", form.secrets}, {"ssh_key", form.sshKeys}} {
		for _, s := range part.secrets {
			w, err := createFilePart(mw, part.name, s.id, "application/octet-stream")
			if err != nil {
				return err
			}
			if _, err := w.Write(s.value); err != nil {
				return err
			}
		}
	}
	if len(form.registryAuth) > 0 {
		type cred struct {
			Username string `json:"username"`
			Password string `json:"password"`
		}
		m := map[string]cred{}
		for h, c := range form.registryAuth {
			m[h] = cred{c.Username, c.Password}
		}
		b, err := json.Marshal(m)
		if err != nil {
			return err
		}
		defer clear(b)
		w, err := createFilePart(mw, "registry_auth", "registry_auth.json", "application/json")
		if err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// createFilePart starts a multipart part with a filename, which the API
// uses as a secret's id or a named context's name.
func createFilePart(mw *multipart.Writer, name, filename, contentType string) (io.Writer, error) {
	h := textproto.MIMEHeader{}
	h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="%s"; filename="%s"`, name, quoteEscaper.Replace(filename)))
	h.Set("Content-Type", contentType)
	return mw.CreatePart(h)
}

// writeNamedContexts sends each --build-context directory as a
// named_context part, a tar chosen by the directory's own .dockerignore.
func writeNamedContexts(ctx context.Context, mw *multipart.Writer, form *buildForm) error {
	for _, n := range form.namedDirs {
		w, err := createFilePart(mw, "named_context", n.name, "application/zstd")
		if err != nil {
			return err
		}
		// No Dockerfile lives in a named context: a path outside it
		// keeps Pack from adding one.
		opt := buildcontext.PackOptions{Dockerfile: "/dev/null", Compression: buildcontext.Zstd}
		if _, err := buildcontext.Pack(ctx, n.dir, w, opt); err != nil {
			return fmt.Errorf("send build context %s (%s): %w", n.name, n.dir, err)
		}
	}
	return nil
}

func writeContextTar(ctx context.Context, mw *multipart.Writer, form *buildForm, bar *uploadBar, stderr io.Writer) (buildcontext.PackStats, error) {
	w, err := createFilePart(mw, "context", "context.tar.zst", "application/zstd")
	if err != nil {
		return buildcontext.PackStats{}, err
	}
	opt := packOptions(form, stderr)
	// zstd keeps up with a fast link at little CPU; the server reads it.
	opt.Compression = buildcontext.Zstd
	if bar != nil {
		opt.Progress = bar.progress
	}
	return buildcontext.Pack(ctx, form.dir, w, opt)
}

// packOptions chooses the context's files, for either upload.
func packOptions(form *buildForm, stderr io.Writer) buildcontext.PackOptions {
	return buildcontext.PackOptions{
		Dockerfile: form.dockerfile,
		Warn:       func(msg string) { fmt.Fprintf(stderr, "kiln: warning: %s\n", msg) },
	}
}

var quoteEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`)

// uploadBar is the one-line upload progress shown on a terminal: files,
// bytes and the percentage of a total that may arrive later (a concurrent
// Scan finds it).
type uploadBar struct {
	out       io.Writer
	label     string
	files     atomic.Int64
	bytes     atomic.Int64
	total     atomic.Int64 // -1 until Scan is done
	start     time.Time
	done      chan struct{}
	wg        sync.WaitGroup
	cancelScn context.CancelFunc
}

func startUploadBar(ctx context.Context, out io.Writer, form *buildForm) *uploadBar {
	return startBar(ctx, out, "Sending build context", scanTotal(form))
}

// scanTotal finds the context's size by walking it without reading any
// content, so it usually finishes long before the upload or the hashing
// and the bar gets a percentage.
func scanTotal(form *buildForm) func(context.Context) (int64, error) {
	return func(ctx context.Context) (int64, error) {
		_, n, err := buildcontext.Scan(ctx, form.dir, buildcontext.PackOptions{Dockerfile: form.dockerfile})
		return n, err
	}
}

// startBar draws "[+] label: N files, X / total (p%)" until stop; total
// runs concurrently and is canceled by stop.
func startBar(ctx context.Context, out io.Writer, label string, total func(context.Context) (int64, error)) *uploadBar {
	b := &uploadBar{out: out, label: label, start: time.Now(), done: make(chan struct{})}
	b.total.Store(-1)
	sctx, cancel := context.WithCancel(ctx)
	b.cancelScn = cancel
	b.wg.Add(2)
	go func() {
		defer b.wg.Done()
		if n, err := total(sctx); err == nil {
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
	line := fmt.Sprintf("[+] %s: %d files, %s", b.label, b.files.Load(), humanSize(b.bytes.Load()))
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
