package cli

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/kiln-build/kiln/api"
)

// This file holds a stand-in kiln server that implements the endpoints the
// CLI calls, as api/openapi.yaml describes them, and records what it saw.

const testToken = "t0ken"

// eventsPlan says how one connection to the events endpoint behaves.
type eventsPlan struct {
	status int // answer with this error status instead of a stream
	send   int // events to send before dropping the connection; -1: all
	// partial: after the last whole event, write half of the next one
	// before dropping, as a connection cut mid-write would.
	partial bool
	// abort: cut the TCP connection instead of ending the response.
	abort bool
}

// uploadSeen is what the server read from POST /v1/builds.
type uploadSeen struct {
	order         []string            // part names in arrival order
	fields        map[string][]string // non-file fields
	secrets       map[string]string   // secret id -> value
	contentLength int64
	contextType   string            // "tar", "tar.gz" or "tar.zst"
	files         map[string]string // tar entries: path -> content ("<dir>", "-> target")
	contextBytes  int64             // context part size as sent
}

type fakeServer struct {
	t   *testing.T
	srv *httptest.Server

	mu sync.Mutex
	// build is what POST /v1/builds answers with and GET returns by
	// default; events is the build's full event script.
	build  api.Build
	events []api.Event
	// plan, if set, decides how events connection number call behaves.
	plan func(call int) eventsPlan
	// getBuild, if set, answers GET /v1/builds/{id} call number call.
	getBuild func(call int) api.Build
	// discardContext: read the context part without unpacking it.
	discardContext bool
	// uploadHook runs after the fields and secrets were read, before the
	// context part is.
	uploadHook func()
	// streaming is signalled when an events connection has sent
	// everything it has and waits for more.
	streaming      chan struct{}
	cancelFinished bool
	// rejectUpload answers POST /v1/builds with this status at once,
	// without reading the body, as a server enforcing a size cap does.
	rejectUpload int

	uploads      []*uploadSeen
	uploadErrs   []error
	eventsCalls  int
	lastEventIDs []string
	getCalls     int
	cancelCalls  int
	requests     []string // "METHOD path" of every request

	extra map[string]http.HandlerFunc // more routes, "METHOD /path"
}

func newFakeServer(t *testing.T) *fakeServer {
	s := &fakeServer{
		t:         t,
		build:     testBuild(api.BuildStatusQueued),
		streaming: make(chan struct{}, 16),
		extra:     map[string]http.HandlerFunc{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/builds", s.auth(s.createBuild))
	mux.HandleFunc("GET /v1/builds/{id}", s.auth(s.handleGetBuild))
	mux.HandleFunc("GET /v1/builds/{id}/events", s.auth(s.handleEvents))
	mux.HandleFunc("POST /v1/builds/{id}/cancel", s.auth(s.handleCancel))
	mux.HandleFunc("/", s.auth(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		h := s.extra[r.Method+" "+r.URL.Path]
		s.mu.Unlock()
		if h == nil {
			writeError(w, http.StatusNotFound, "no route "+r.Method+" "+r.URL.Path, "not_found")
			return
		}
		h(w, r)
	}))
	s.srv = httptest.NewServer(mux)
	t.Cleanup(s.srv.Close)
	return s
}

// handle adds a route matched on the unescaped path.
func (s *fakeServer) handle(methodPath string, h http.HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.extra[methodPath] = h
}

func (s *fakeServer) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.requests = append(s.requests, r.Method+" "+r.URL.Path)
		s.mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer "+testToken {
			writeError(w, http.StatusUnauthorized, "missing or invalid token", "unauthorized")
			return
		}
		h(w, r)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg, code string) {
	writeJSON(w, status, api.Error{Error: msg, Code: &code})
}

func testBuild(status api.BuildStatus) api.Build {
	created := time.Now().Add(-3 * time.Minute)
	b := api.Build{
		Id:         "b1",
		Status:     status,
		Phase:      "queued",
		CacheScope: "team",
		Tags:       []string{"app:1"},
		Image:      "builds/b1",
		Runtime:    "process",
		CreatedAt:  created,
	}
	if status == api.BuildStatusQueued {
		pos := 0
		b.QueuePosition = &pos
	}
	return b
}

func finishedBuild(status api.BuildStatus, errMsg string) api.Build {
	b := testBuild(status)
	b.Phase = "done"
	started, finished := b.CreatedAt.Add(time.Second), b.CreatedAt.Add(13*time.Second)
	b.StartedAt, b.FinishedAt = &started, &finished
	b.StepsTotal, b.StepsCached = 3, 1
	if status == api.BuildStatusSucceeded {
		d := "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
		b.ImageDigest = &d
	}
	if errMsg != "" {
		b.Error = &errMsg
	}
	return b
}

func p[T any](v T) *T { return &v }

// eventScript is a plausible build: a cached base, a step with logLines
// lines of output, a message, and the end event with the final build. With
// final nil there is no end event: the build is still running.
func eventScript(logLines int, final *api.Build) []api.Event {
	t0 := time.Date(2025, 1, 2, 12, 0, 0, 0, time.UTC)
	var evs []api.Event
	add := func(e api.Event) {
		e.Id = int64(len(evs) + 1)
		e.Time = t0.Add(time.Duration(len(evs)) * 100 * time.Millisecond)
		evs = append(evs, e)
	}
	add(api.Event{Kind: "status", Status: p("running")})
	add(api.Event{Kind: "phase", Phase: p("solving")})
	add(api.Event{Kind: "vertex.started", Vertex: p("sha256:v1"), Name: p("[1/3] FROM docker.io/library/alpine:3")})
	add(api.Event{Kind: "vertex.cached", Vertex: p("sha256:v1"), Name: p("[1/3] FROM docker.io/library/alpine:3")})
	add(api.Event{Kind: "vertex.started", Vertex: p("sha256:v2"), Name: p("[2/3] RUN make")})
	for i := 1; i <= logLines; i++ {
		add(api.Event{Kind: "log", Vertex: p("sha256:v2"), Stream: p(1), Data: p(fmt.Sprintf("compiling unit %d\n", i))})
	}
	if final == nil {
		return evs
	}
	if final.Status == api.BuildStatusFailed {
		add(api.Event{Kind: "vertex.errored", Vertex: p("sha256:v2"), Name: p("[2/3] RUN make"), Error: p("exit code: 2")})
	} else {
		add(api.Event{Kind: "vertex.completed", Vertex: p("sha256:v2"), Name: p("[2/3] RUN make")})
		add(api.Event{Kind: "phase", Phase: p("pushing")})
		add(api.Event{Kind: "message", Message: p("pushed builds/b1")})
	}
	add(api.Event{Kind: "end", Build: final})
	return evs
}

func (s *fakeServer) createBuild(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	reject := s.rejectUpload
	s.mu.Unlock()
	if reject != 0 {
		writeError(w, reject, "the build context is larger than context.max_bytes (1 MiB); shrink it with .dockerignore", "too_large")
		return
	}
	seen, err := s.readUpload(r)
	s.mu.Lock()
	s.uploads = append(s.uploads, seen)
	s.uploadErrs = append(s.uploadErrs, err)
	b := s.build
	s.mu.Unlock()
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad upload: "+err.Error(), "bad_request")
		return
	}
	writeJSON(w, http.StatusAccepted, b)
}

// readUpload reads the multipart body part by part, as the real server
// must (it never holds the context in memory).
func (s *fakeServer) readUpload(r *http.Request) (*uploadSeen, error) {
	seen := &uploadSeen{fields: map[string][]string{}, secrets: map[string]string{}, contentLength: r.ContentLength}
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" {
		return seen, fmt.Errorf("content type %q is not multipart/form-data", r.Header.Get("Content-Type"))
	}
	mr, err := r.MultipartReader()
	if err != nil {
		return seen, err
	}
	hooked := false
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return seen, fmt.Errorf("next part: %w", err)
		}
		name := part.FormName()
		seen.order = append(seen.order, name)
		switch name {
		case "secret":
			v, err := io.ReadAll(part)
			if err != nil {
				return seen, err
			}
			seen.secrets[part.FileName()] = string(v)
		case "context":
			s.mu.Lock()
			hook, discard := s.uploadHook, s.discardContext
			s.mu.Unlock()
			if hook != nil && !hooked {
				hooked = true
				hook()
			}
			if discard {
				n, err := io.Copy(io.Discard, part)
				seen.contextBytes = n
				if err != nil {
					return seen, err
				}
				continue
			}
			if err := readContext(part, seen); err != nil {
				return seen, fmt.Errorf("context: %w", err)
			}
		default:
			v, err := io.ReadAll(part)
			if err != nil {
				return seen, err
			}
			seen.fields[name] = append(seen.fields[name], string(v))
		}
	}
	return seen, nil
}

// readContext unpacks the context part in memory (test contexts are
// small) into seen.files.
func readContext(r io.Reader, seen *uploadSeen) error {
	cr := &countingReader{r: r}
	br := bufio.NewReader(cr)
	magic, _ := br.Peek(4)
	var tr io.Reader = br
	closeDecoder := func() {}
	switch {
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		seen.contextType = "tar.zst"
		// Inline decoding: a background decoder would still be reading br
		// when the rest of the part is drained below.
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return err
		}
		closeDecoder = zr.Close
		tr = zr
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		seen.contextType = "tar.gz"
		zr, err := gzip.NewReader(br)
		if err != nil {
			return err
		}
		tr = zr
	default:
		seen.contextType = "tar"
	}
	defer closeDecoder()
	seen.files = map[string]string{}
	t := tar.NewReader(tr)
	for {
		h, err := t.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("not a valid tar: %w", err)
		}
		name := strings.TrimSuffix(h.Name, "/")
		switch h.Typeflag {
		case tar.TypeDir:
			seen.files[name] = "<dir>"
		case tar.TypeSymlink:
			seen.files[name] = "-> " + h.Linkname
		case tar.TypeReg:
			b, err := io.ReadAll(t)
			if err != nil {
				return fmt.Errorf("read %s: %w", name, err)
			}
			seen.files[name] = string(b)
		default:
			seen.files[name] = fmt.Sprintf("<type %c>", h.Typeflag)
		}
	}
	closeDecoder()
	closeDecoder = func() {}
	// Drain what follows the archive (the compressor's trailer).
	if _, err := io.Copy(io.Discard, br); err != nil {
		return err
	}
	seen.contextBytes = cr.n
	return nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (s *fakeServer) handleGetBuild(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	call := s.getCalls
	s.getCalls++
	b, get := s.build, s.getBuild
	s.mu.Unlock()
	if r.PathValue("id") != b.Id {
		writeError(w, http.StatusNotFound, "no build "+r.PathValue("id"), "not_found")
		return
	}
	if get != nil {
		b = get(call)
	}
	writeJSON(w, http.StatusOK, b)
}

func (s *fakeServer) handleCancel(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.cancelCalls++
	b, finished := s.build, s.cancelFinished
	s.mu.Unlock()
	if r.PathValue("id") != b.Id {
		writeError(w, http.StatusNotFound, "no build "+r.PathValue("id"), "not_found")
		return
	}
	if finished {
		writeJSON(w, http.StatusConflict, finishedBuild(api.BuildStatusSucceeded, ""))
		return
	}
	c := finishedBuild(api.BuildStatusCanceled, "canceled by user")
	writeJSON(w, http.StatusOK, c)
}

// handleEvents serves the SSE stream: resumes after Last-Event-ID (or
// ?after=), follows the plan for this connection, closes after the end
// event, and otherwise holds the connection open with heartbeats.
func (s *fakeServer) handleEvents(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	call := s.eventsCalls
	s.eventsCalls++
	s.lastEventIDs = append(s.lastEventIDs, r.Header.Get("Last-Event-ID"))
	plan := eventsPlan{send: -1}
	if s.plan != nil {
		plan = s.plan(call)
	}
	evs, id := s.events, s.build.Id
	s.mu.Unlock()

	if r.PathValue("id") != id {
		writeError(w, http.StatusNotFound, "no build "+r.PathValue("id"), "not_found")
		return
	}
	if plan.status != 0 {
		writeError(w, plan.status, "events backend unavailable", "unavailable")
		return
	}
	var after int64
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		after, _ = strconv.ParseInt(v, 10, 64)
	} else if v := r.URL.Query().Get("after"); v != "" {
		after, _ = strconv.ParseInt(v, 10, 64)
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	io.WriteString(w, ": heartbeat\n\n")
	sent := 0
	for _, e := range evs {
		if e.Id <= after {
			continue
		}
		data, _ := json.Marshal(e)
		if plan.send >= 0 && sent == plan.send {
			if plan.partial {
				fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s", e.Id, e.Kind, data[:len(data)/2])
			}
			fl.Flush()
			if plan.abort {
				conn, _, err := http.NewResponseController(w).Hijack()
				if err == nil {
					conn.Close()
				}
			}
			return
		}
		fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", e.Id, e.Kind, data)
		fl.Flush()
		sent++
		if e.Kind == "end" {
			return
		}
	}
	// Still running: keep the stream open like the real server does.
	select {
	case s.streaming <- struct{}{}:
	default:
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
			io.WriteString(w, ": heartbeat\n\n")
			fl.Flush()
		}
	}
}

// uploadAttempt waits for the server to finish reading upload i; the
// handler may still be reading when an aborted client has returned.
func (s *fakeServer) uploadAttempt(t *testing.T, i int) (*uploadSeen, error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		if len(s.uploads) > i {
			up, err := s.uploads[i], s.uploadErrs[i]
			s.mu.Unlock()
			return up, err
		}
		s.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("the server never saw upload %d", i)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// upload returns upload i, which must have been read without error.
func (s *fakeServer) upload(t *testing.T, i int) *uploadSeen {
	t.Helper()
	up, err := s.uploadAttempt(t, i)
	if err != nil {
		t.Fatalf("server could not read upload %d: %v", i, err)
	}
	return up
}

func (s *fakeServer) uploadErr(t *testing.T, i int) error {
	t.Helper()
	_, err := s.uploadAttempt(t, i)
	return err
}

func (s *fakeServer) seenRequests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

func (s *fakeServer) counts() (events, gets, cancels int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.eventsCalls, s.getCalls, s.cancelCalls
}

// syncBuffer is a bytes.Buffer safe to read while a command writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

var testSettings = settings{
	reconnectMin:   5 * time.Millisecond,
	reconnectMax:   40 * time.Millisecond,
	streamFailures: 3,
	pollInterval:   20 * time.Millisecond,
	idleTimeout:    5 * time.Second,
	redraw:         5 * time.Millisecond,
	cancelTimeout:  5 * time.Second,
}

type result struct {
	code           int
	stdout, stderr string
}

// kiln runs a command line in-process against s.
func (s *fakeServer) kiln(ctx context.Context, args ...string) result {
	return runKiln(ctx, nil, append(args, "--addr", s.srv.URL, "--token", testToken)...)
}

func runKiln(ctx context.Context, stdin io.Reader, args ...string) result {
	var out, errOut syncBuffer
	if stdin == nil {
		stdin = strings.NewReader("")
	}
	code := run(ctx, args, stdin, &out, &errOut, testSettings)
	return result{code, out.String(), errOut.String()}
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\n--- stdout\n%s--- stderr\n%s", r.code, r.stdout, r.stderr)
}
