package server

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"
)

// minUploadRate fails request bodies that trickle in slower than
// minBytesPerSec, measured over each window. A whole-request ReadTimeout
// cannot do this: it either cuts off honest multi-gigabyte uploads or lets
// a slowloris client hold a connection (and an upload slot) for as long as
// the timeout allows, one byte at a time.
//
// The deadline goes on the connection only when the handler first reads the
// body, so time spent before that (authentication, queueing for an upload
// slot) is not blamed on the client. Bytes count when the handler reads them,
// so a handler that stops reading for longer than window will see its next
// read fail too.
//
// minBytesPerSec <= 0 or window <= 0 disables the check.
func minUploadRate(next http.Handler, minBytesPerSec int64, window time.Duration) http.Handler {
	if minBytesPerSec <= 0 || window <= 0 {
		return next
	}
	// Float math: minBytesPerSec*int64(window) overflows for large rates.
	quota := max(int64(float64(minBytesPerSec)*window.Seconds()), 1)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || r.Body == http.NoBody {
			next.ServeHTTP(w, r)
			return
		}
		r2 := *r // net/http forbids handlers to modify the Request they got
		r2.Body = &rateBody{ReadCloser: r.Body, rc: http.NewResponseController(w),
			rate: minBytesPerSec, window: window, quota: quota}
		next.ServeHTTP(w, &r2)
	})
}

// slowUploadError is what a body read returns when the client missed the
// minimum rate. It is a type so handlers can answer 408 with errors.As.
type slowUploadError struct {
	Rate   int64
	Window time.Duration
	Err    error
}

func (e *slowUploadError) Error() string {
	return fmt.Sprintf("upload slower than %d bytes/s over %s; the connection was closed (%v)", e.Rate, e.Window, e.Err)
}

func (e *slowUploadError) Unwrap() error { return e.Err }

type rateBody struct {
	io.ReadCloser
	rc     *http.ResponseController
	rate   int64
	window time.Duration
	quota  int64 // bytes each window must carry

	// mu guards the state below; Close may come from another goroutine
	// than Read (for example a handler abandoning an upload).
	mu    sync.Mutex
	armed bool  // a deadline has been set on the connection
	done  bool  // EOF, Close, failure or no deadline support: never touch the deadline again
	slow  bool  // our deadline expired
	got   int64 // bytes since the last checkpoint
}

func (b *rateBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	if !b.armed && !b.done {
		b.armed = true
		// An unsupported ResponseWriter (wrapped without Unwrap) means no
		// enforcement rather than failing every upload.
		if b.rc.SetReadDeadline(time.Now().Add(b.window)) != nil {
			b.done = true
		}
	}
	b.mu.Unlock()

	n, err := b.ReadCloser.Read(p)

	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.done:
	case err == io.EOF:
		b.clearLocked()
	case errors.Is(err, os.ErrDeadlineExceeded):
		// Leave the expired deadline in place: the connection is
		// unusable mid-body, so later reads must fail the same way.
		b.done, b.slow = true, true
	case err == nil:
		b.got += int64(n)
		if b.got >= b.quota {
			b.got = 0
			b.rc.SetReadDeadline(time.Now().Add(b.window))
		}
	}
	if b.slow && errors.Is(err, os.ErrDeadlineExceeded) {
		err = &slowUploadError{Rate: b.rate, Window: b.window, Err: err}
	}
	return n, err
}

// Close clears the deadline. Once the body is done net/http keeps a
// background read on the connection, and a deadline firing there cancels
// the request context of a handler still working (golang/go#70834). Go
// 1.26 clears the deadline itself when it starts that read; clearing here
// too keeps the guarantee from depending on it. The clear comes after the
// underlying Close because that Close drains the rest of a small body,
// and the drain should stay under the deadline.
func (b *rateBody) Close() error {
	err := b.ReadCloser.Close()
	b.mu.Lock()
	if !b.done {
		b.clearLocked()
	}
	b.mu.Unlock()
	return err
}

func (b *rateBody) clearLocked() {
	b.done = true
	if b.armed {
		b.rc.SetReadDeadline(time.Time{})
	}
}
