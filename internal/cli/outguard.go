package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// outputError is why a build stopped being followed when a write to the
// client's own standard output or error failed: a reader that went away
// (`kiln build . 2>&1 | head -1`, a CI runner whose log collector died).
// Nobody is left to see the build, so it is canceled, as buildx's build
// ends when its session does.
type outputError struct {
	stream string // "standard output" or "standard error"
	err    error
}

func (e *outputError) Error() string { return fmt.Sprintf("write to %s: %v", e.stream, e.err) }
func (e *outputError) Unwrap() error { return e.err }

// guardedWriter passes writes through to w and, on the first failed one,
// calls fail with an *outputError. It is safe for concurrent use (the tty
// view repaints from its own goroutine).
type guardedWriter struct {
	w      io.Writer
	stream string
	fail   context.CancelCauseFunc

	mu  sync.Mutex
	err error
}

func newGuardedWriter(w io.Writer, stream string, fail context.CancelCauseFunc) *guardedWriter {
	return &guardedWriter{w: w, stream: stream, fail: fail}
}

func (g *guardedWriter) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.w.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		g.err = &outputError{stream: g.stream, err: err}
		if g.fail != nil {
			g.fail(g.err)
		}
	}
	return n, err
}

// Unwrap gives terminalOf the writer underneath.
func (g *guardedWriter) Unwrap() io.Writer { return g.w }

// broken returns the first write error, if any.
func (g *guardedWriter) broken() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.err
}

// outputFailed returns the *outputError that ended ctx, if that is why.
func outputFailed(ctx context.Context) (*outputError, bool) {
	var oe *outputError
	if errors.As(context.Cause(ctx), &oe) {
		return oe, true
	}
	return nil, false
}

// catchSIGPIPE makes a write to a closed pipe on file descriptors 1 and 2
// fail with EPIPE instead of killing the process (Go's default for those
// two descriptors), so that the write's error can cancel the build. It
// stays in force until the process exits: the error message printed last
// must not turn into a death by SIGPIPE either.
func catchSIGPIPE() {
	sigpipeOnce.Do(func() {
		signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	})
}

var sigpipeOnce sync.Once

// kilnLinesOnly passes on the writes that are kiln's own warnings and
// errors ("kiln: ..." lines) and drops the rest: the upload's summary has
// no place in a machine-readable or quiet stderr.
type kilnLinesOnly struct{ w io.Writer }

func (k kilnLinesOnly) Write(p []byte) (int, error) {
	if !bytes.HasPrefix(p, []byte("kiln: ")) {
		return len(p), nil
	}
	return k.w.Write(p)
}
