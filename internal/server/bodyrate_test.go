package server

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
)

// A client trickling one byte per 200ms against 100 B/s over 500ms must be
// cut off after about one window, and the handler must see why.
func TestMinUploadRateFailsSlowClient(t *testing.T) {
	got := make(chan error, 1)
	h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.ReadAll(r.Body)
		if err != nil {
			// Reading on must keep failing the same explained way.
			if _, again := r.Body.Read(make([]byte, 1)); !errors.As(again, new(*slowUploadError)) {
				t.Errorf("read after the failure gave %v, want a *slowUploadError", again)
			}
			http.Error(w, err.Error(), http.StatusRequestTimeout)
		}
		got <- err
	}), 100, 500*time.Millisecond)
	srv := httptest.NewServer(h)
	defer srv.Close()

	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: kiln\r\nContent-Length: 1000\r\n\r\n")
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			if _, err := conn.Write([]byte("x")); err != nil {
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()

	select {
	case err = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("slow upload was not cut off within 5s")
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("cut off after %s, want about one 500ms window", el)
	}
	var slow *slowUploadError
	if !errors.As(err, &slow) {
		t.Fatalf("handler got %v, want a *slowUploadError", err)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("%v does not wrap the deadline error", err)
	}
	for _, want := range []string{"100 bytes/s", "500ms", "connection was closed"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}

	// The message promises the connection is closed: net/http must not
	// parse the rest of the trickle as a next request.
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body) // Close alone skips the body of a Connection: close answer
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout {
		t.Errorf("status %d, want 408", resp.StatusCode)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the answer the connection gave %v, want EOF (closed)", err)
	}
}

// A client keeping just above the rate across many windows passes: the
// deadline must move with each checkpoint, not stay at the first window.
func TestMinUploadRateSteadyClientPasses(t *testing.T) {
	const chunk, chunks = 40, 15 // 40 bytes per 100ms = 400 B/s for 1.5s
	h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusRequestTimeout)
			return
		}
		fmt.Fprint(w, len(b))
	}), 100, 500*time.Millisecond)
	srv := httptest.NewServer(h)
	defer srv.Close()

	pr, pw := io.Pipe()
	go func() {
		for range chunks {
			pw.Write(bytes.Repeat([]byte("x"), chunk))
			time.Sleep(100 * time.Millisecond)
		}
		pw.Close()
	}()
	resp, err := http.Post(srv.URL, "application/octet-stream", pr) // chunked
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != fmt.Sprint(chunk*chunks) {
		t.Fatalf("got %d %q, want 200 %d", resp.StatusCode, body, chunk*chunks)
	}
}

// A fast multi-MiB upload crosses many checkpoints without trouble.
func TestMinUploadRateFastLargeBodyPasses(t *testing.T) {
	const size = 8 << 20
	h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusRequestTimeout)
			return
		}
		fmt.Fprint(w, n)
	}), 1<<20, 500*time.Millisecond) // checkpoint every 512 KiB
	srv := httptest.NewServer(h)
	defer srv.Close()

	resp, err := http.Post(srv.URL, "application/octet-stream", bytes.NewReader(make([]byte, size)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != fmt.Sprint(size) {
		t.Fatalf("got %d %q, want 200 %d", resp.StatusCode, body, size)
	}
}

// Once the body is done, a handler working longer than the window keeps a
// live context. A deadline left or re-armed on the connection after the
// body's EOF would fire in net/http's background read and cancel the
// request context (e.g. checkpointing the final read instead of clearing
// makes this fail).
func TestMinUploadRateClearsDeadlineAfterBody(t *testing.T) {
	const window = 200 * time.Millisecond
	for name, consume := range map[string]func(r *http.Request) error{
		"read to EOF": func(r *http.Request) error {
			_, err := io.ReadAll(r.Body)
			return err
		},
		// Close drains the small rest of the body itself, which is when
		// net/http starts its background read.
		"close early": func(r *http.Request) error {
			if _, err := io.ReadFull(r.Body, make([]byte, 10)); err != nil {
				return err
			}
			return r.Body.Close()
		},
	} {
		t.Run(name, func(t *testing.T) {
			h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if err := consume(r); err != nil {
					http.Error(w, err.Error(), http.StatusBadRequest)
					return
				}
				select {
				case <-r.Context().Done():
					http.Error(w, "context canceled while working: "+context.Cause(r.Context()).Error(), http.StatusInternalServerError)
				case <-time.After(4 * window):
					fmt.Fprint(w, "alive")
				}
			}), 100, window)
			srv := httptest.NewServer(h)
			defer srv.Close()

			resp, err := http.Post(srv.URL, "application/octet-stream", strings.NewReader(strings.Repeat("x", 1000)))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("got %d %s", resp.StatusCode, body)
			}
		})
	}
}

// Zero disables the check: a body slower than any window still arrives.
func TestMinUploadRateDisabled(t *testing.T) {
	h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusRequestTimeout)
			return
		}
		w.Write(b)
	}), 0, 50*time.Millisecond)
	srv := httptest.NewServer(h)
	defer srv.Close()

	pr, pw := io.Pipe()
	go func() {
		for range 4 {
			time.Sleep(100 * time.Millisecond)
			pw.Write([]byte("x"))
		}
		pw.Close()
	}()
	resp, err := http.Post(srv.URL, "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != "xxxx" {
		t.Fatalf("got %d %q, want 200 xxxx", resp.StatusCode, body)
	}
}

// Requests without a body are passed through untouched.
func TestMinUploadRateNoBody(t *testing.T) {
	h := minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != http.NoBody {
			t.Errorf("body is %T, want http.NoBody", r.Body)
		}
	}), 100, time.Second)
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}
