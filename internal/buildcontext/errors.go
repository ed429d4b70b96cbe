package buildcontext

import (
	"context"
	"errors"
	"fmt"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// Error is what Receive returns for every failure. Class is the errdefs
// class of the failure (internal/server maps it to a status); Msg is safe
// to show to the client verbatim: it says what was wrong with the upload
// and what to do about it.
//
// Classes: errdefs.ErrInvalid the upload is not an acceptable context,
// errdefs.ErrTooLarge it exceeds a limit, errdefs.ErrMissingContent a
// manifest names content the server lacks, errdefs.ErrUpstream (and
// ErrUpstreamTimeout) a git remote failed, errdefs.ErrTimeout and
// errdefs.ErrCanceled the upload was cut short by a deadline or
// cancellation, and nil the server failed to store it (disk full, bad
// target directory): kiln's own fault.
type Error struct {
	Class error
	Msg   string
	err   error // cause, for errors.Is/As (e.g. context.Canceled); never shown
}

func (e *Error) Error() string { return e.Msg }

// Unwrap exposes the class and the cause so callers can test for
// errdefs.ErrInvalid, context.Canceled and friends without parsing the
// message.
func (e *Error) Unwrap() []error {
	var out []error
	for _, err := range []error{e.Class, e.err} {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

func badInput(format string, args ...any) *Error {
	return &Error{Class: errdefs.ErrInvalid, Msg: fmt.Sprintf(format, args...)}
}

func tooLarge(format string, args ...any) *Error {
	return &Error{Class: errdefs.ErrTooLarge, Msg: fmt.Sprintf(format, args...)}
}

func serverFault(err error, format string, args ...any) *Error {
	return &Error{
		Msg: fmt.Sprintf(format, args...) + ": " + err.Error(),
		err: err,
	}
}

func canceled(err error) *Error {
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Class: errdefs.ErrTimeout, Msg: "receiving the build context took too long and was stopped; retry, or send a smaller context", err: err}
	}
	return &Error{Class: errdefs.ErrCanceled, Msg: "receiving the build context was canceled", err: err}
}

// formatBytes renders a limit the way an operator wrote it in the config:
// "500 MiB", "2 GiB", "1.5 GiB", "900 bytes".
func formatBytes(n int64) string {
	units := []struct {
		size int64
		name string
	}{{1 << 40, "TiB"}, {1 << 30, "GiB"}, {1 << 20, "MiB"}, {1 << 10, "KiB"}}
	for _, u := range units {
		if n >= u.size {
			if n%u.size == 0 {
				return fmt.Sprintf("%d %s", n/u.size, u.name)
			}
			return fmt.Sprintf("%.1f %s", float64(n)/float64(u.size), u.name)
		}
	}
	if n == 1 {
		return "1 byte"
	}
	return fmt.Sprintf("%d bytes", n)
}
