package buildcontext

import (
	"context"
	"errors"
	"fmt"
	"net/http"
)

// Error is what Receive returns for every failure. Status is the HTTP status
// the server should answer with; Msg is safe to show to the client verbatim:
// it says what was wrong with the upload and what to do about it.
//
// Statuses: 400 the upload is not an acceptable context, 413 it exceeds a
// limit, 408/499 the upload was cut short by a deadline or cancellation, 500
// the server failed to store it (disk full, bad target directory).
type Error struct {
	Status int
	Msg    string
	err    error // cause, for errors.Is/As (e.g. context.Canceled); never shown
}

func (e *Error) Error() string { return e.Msg }

// Unwrap exposes the cause so callers can test for context.Canceled and
// friends without parsing the message.
func (e *Error) Unwrap() error { return e.err }

// statusClientClosedRequest is nginx's convention for "the client went away";
// net/http accepts any three-digit code.
const statusClientClosedRequest = 499

func badInput(format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Msg: fmt.Sprintf(format, args...)}
}

func tooLarge(format string, args ...any) *Error {
	return &Error{Status: http.StatusRequestEntityTooLarge, Msg: fmt.Sprintf(format, args...)}
}

func serverFault(err error, format string, args ...any) *Error {
	return &Error{
		Status: http.StatusInternalServerError,
		Msg:    fmt.Sprintf(format, args...) + ": " + err.Error(),
		err:    err,
	}
}

func canceled(err error) *Error {
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Status: http.StatusRequestTimeout, Msg: "receiving the build context took too long and was stopped; retry, or send a smaller context", err: err}
	}
	return &Error{Status: statusClientClosedRequest, Msg: "receiving the build context was canceled", err: err}
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
