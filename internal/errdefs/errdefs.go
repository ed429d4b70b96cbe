// Package errdefs is kiln's one error vocabulary. Domain packages say what
// kind of thing went wrong — invalid input, not found, forbidden, a
// conflict, a limit, an unavailable or failing upstream — and never which
// HTTP status that is; internal/server maps the classes to statuses once,
// as containerd's errdefs and distribution's errcode do.
package errdefs

import (
	"errors"
	"fmt"
	"time"
)

// The classes. Test with errors.Is; wrap with the constructors below, or
// with fmt.Errorf("...: %w", ErrNotFound) where the message is built up.
var (
	ErrInvalid     = errors.New("invalid request")
	ErrForbidden   = errors.New("forbidden")
	ErrNotFound    = errors.New("not found")
	ErrConflict    = errors.New("conflict")
	ErrLimit       = errors.New("over a limit")
	ErrUnavailable = errors.New("unavailable")
	ErrUpstream    = errors.New("upstream failed")
)

// Error is a classified error whose message is written for the user: it
// says what was wrong and what to do.
type Error struct {
	Class error
	Msg   string
	// RetryAfter, when set, tells the client when trying again may work.
	RetryAfter time.Duration
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Class }

func newf(class error, format string, args []any) error {
	return &Error{Class: class, Msg: fmt.Sprintf(format, args...)}
}

// Invalid is bad input: fixing the request fixes it.
func Invalid(format string, args ...any) error { return newf(ErrInvalid, format, args) }

// Forbidden is a request the caller may not make.
func Forbidden(format string, args ...any) error { return newf(ErrForbidden, format, args) }

// NotFound is a missing thing, or one the caller may not see.
func NotFound(format string, args ...any) error { return newf(ErrNotFound, format, args) }

// Conflict is a request the current state refuses.
func Conflict(format string, args ...any) error { return newf(ErrConflict, format, args) }

// Upstream is a failure of a system kiln depends on, such as another
// registry.
func Upstream(format string, args ...any) error { return newf(ErrUpstream, format, args) }

// Limit is a request over a limit that passes with time.
func Limit(retryAfter time.Duration, format string, args ...any) error {
	return &Error{Class: ErrLimit, Msg: fmt.Sprintf(format, args...), RetryAfter: retryAfter}
}

// Quote renders a user-supplied value for an error message, cut short so
// an error never echoes a large value back.
func Quote(v string) string {
	const max = 64
	if len(v) <= max {
		return fmt.Sprintf("%q", v)
	}
	return fmt.Sprintf("%q… (%d bytes)", v[:max], len(v))
}
