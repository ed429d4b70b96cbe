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
// A narrower class wraps its broader one (ErrInUse is an ErrConflict), so
// a caller that only knows the broad class still recognizes it.
var (
	ErrInvalid = errors.New("invalid request")
	// ErrTooLarge is input over a size or count limit that time does not
	// lift: make it smaller.
	ErrTooLarge = Sentinel(ErrInvalid, "too large")
	// ErrUnauthenticated is a request without valid credentials: a token
	// missing, malformed, expired or revoked.
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrForbidden       = errors.New("forbidden")
	ErrNotFound        = errors.New("not found")
	ErrConflict        = errors.New("conflict")
	// ErrInUse is a resource something else holds; it frees up when that
	// ends.
	ErrInUse = Sentinel(ErrConflict, "in use")
	// ErrMissingContent is a request naming content the server does not
	// hold (never sent, or evicted since): send it and retry.
	ErrMissingContent = Sentinel(ErrConflict, "missing content")
	ErrLimit          = errors.New("over a limit")
	// ErrTimeout is a request stopped because it took too long.
	ErrTimeout = errors.New("timed out")
	// ErrCanceled is a request its caller gave up on.
	ErrCanceled    = errors.New("canceled")
	ErrUnavailable = errors.New("unavailable")
	ErrUpstream    = errors.New("upstream failed")
	// ErrUpstreamTimeout is a system kiln depends on that did not answer
	// in time.
	ErrUpstreamTimeout = Sentinel(ErrUpstream, "upstream timed out")
)

// Classes lists every class, narrower ones before the classes they wrap,
// so the first that errors.Is matches is the most precise.
func Classes() []error {
	return []error{
		ErrTooLarge, ErrInvalid, ErrUnauthenticated, ErrForbidden, ErrNotFound,
		ErrInUse, ErrMissingContent, ErrConflict, ErrLimit, ErrTimeout, ErrCanceled,
		ErrUnavailable, ErrUpstreamTimeout, ErrUpstream,
	}
}

// Sentinel returns a new named error of class whose text is text: a
// package's own sentinel (cachevol.ErrInUse) that errors.Is also matches
// to class, without the class's name in its text.
func Sentinel(class error, text string) error { return &sentinel{text: text, class: class} }

type sentinel struct {
	text  string
	class error
}

func (s *sentinel) Error() string { return s.text }
func (s *sentinel) Unwrap() error { return s.class }

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
