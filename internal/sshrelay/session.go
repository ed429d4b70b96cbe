package sshrelay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

// Protocol is the Upgrade token of the session.
const Protocol = "kiln-ssh/1"

// MaxIDs bounds the agent ids one build may name.
const MaxIDs = 16

// idPattern is what an agent id may be: what survives a multipart file
// name and a BuildKit ssh mount id unchanged (as a secret id).
var idPattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,128}$`)

// ValidID reports whether id can name an agent.
func ValidID(id string) bool { return idPattern.MatchString(id) }

const (
	// maxLine bounds a header or reply line.
	maxLine = 4 << 10
	// handshakeTimeout bounds one stream's header exchange.
	handshakeTimeout = 30 * time.Second
)

// ErrClosed is what Dial returns once the session has ended.
var ErrClosed = errors.New("the client's ssh session has ended")

type header struct {
	ID string `json:"id"`
}

type reply struct {
	Error string `json:"error,omitempty"`
}

func muxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	// A dead peer is found by keepalives; a slow one gets the write
	// timeout to catch up.
	c.KeepAliveInterval = 15 * time.Second
	c.ConnectionWriteTimeout = 30 * time.Second
	c.StreamOpenTimeout = 30 * time.Second
	c.LogOutput = io.Discard
	return c
}

// Session is the server's end of one build's ssh session: it dials agent
// connections on the client. Its methods are safe for concurrent use.
type Session struct {
	mux *yamux.Session
}

// Server starts the server's end of a session on conn, the connection the
// client upgraded. The Session owns conn.
func Server(conn io.ReadWriteCloser) (*Session, error) {
	mux, err := yamux.Client(conn, muxConfig())
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start the ssh session: %w", err)
	}
	return &Session{mux: mux}, nil
}

// Dial opens one connection to the client's agent id.
func (s *Session) Dial(ctx context.Context, id string) (net.Conn, error) {
	stream, err := s.mux.OpenStream()
	if err != nil {
		if s.mux.IsClosed() {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("open an agent connection on the client's ssh session: %w", err)
	}
	deadline := time.Now().Add(handshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	stream.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { stream.SetDeadline(time.Now()) })
	defer stop()
	var r reply
	err = writeLine(stream, header{ID: id})
	if err == nil {
		err = readLine(stream, &r)
	}
	if err != nil {
		stream.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if s.mux.IsClosed() {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("the client did not answer for ssh agent %q: %w", id, err)
	}
	if r.Error != "" {
		stream.Close()
		return nil, fmt.Errorf("the client refused ssh agent %q: %s", id, r.Error)
	}
	if !stop() {
		stream.Close()
		return nil, ctx.Err()
	}
	stream.SetDeadline(time.Time{})
	return stream, nil
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close ends the session and every agent connection on it.
func (s *Session) Close() error { return s.mux.Close() }

// Handler answers one agent connection of the session. It is called with
// the stream of an id Lookup accepted and owns it.
type Handler func(stream net.Conn)

// Serve is the client's end of a session on conn, the upgraded connection:
// it answers the server's agent connections with lookup(id)'s handler
// until the session ends or ctx is done, and returns why it ended (nil
// when the connection closed: the server ended the session, or the
// connection dropped; the build's status tells which). lookup returns an error, which the server
// sees, for an id the client does not serve.
func Serve(ctx context.Context, conn io.ReadWriteCloser, lookup func(id string) (Handler, error)) error {
	mux, err := yamux.Server(conn, muxConfig())
	if err != nil {
		conn.Close()
		return fmt.Errorf("start the ssh session: %w", err)
	}
	defer mux.Close()
	stop := context.AfterFunc(ctx, func() { mux.Close() })
	defer stop()
	for {
		stream, err := mux.AcceptStream()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// The server closing the connection surfaces as whichever
			// of yamux's loops noticed first: a read's EOF or a write's
			// broken pipe.
			if errors.Is(err, io.EOF) || errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, io.ErrClosedPipe) ||
				errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
				return nil
			}
			return err
		}
		go answer(stream, lookup)
	}
}

func answer(stream net.Conn, lookup func(id string) (Handler, error)) {
	stream.SetDeadline(time.Now().Add(handshakeTimeout))
	var h header
	if err := readLine(stream, &h); err != nil {
		stream.Close()
		return
	}
	handle, err := lookup(h.ID)
	if err != nil {
		writeLine(stream, reply{Error: err.Error()})
		stream.Close()
		return
	}
	if writeLine(stream, reply{}) != nil {
		stream.Close()
		return
	}
	stream.SetDeadline(time.Time{})
	handle(stream)
}

func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// readLine reads one JSON line byte by byte, so nothing after it (the
// agent protocol) is consumed.
func readLine(r io.Reader, v any) error {
	var line []byte
	var b [1]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return err
		}
		if b[0] == '\n' {
			break
		}
		if len(line) >= maxLine {
			return fmt.Errorf("line longer than %d bytes", maxLine)
		}
		line = append(line, b[0])
	}
	if err := json.Unmarshal(bytes.TrimSpace(line), v); err != nil {
		return fmt.Errorf("not a JSON line: %w", err)
	}
	return nil
}
