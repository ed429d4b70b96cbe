package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// readLine reads one '\n'-terminated line a byte at a time, so nothing
// behind the line is consumed: after the hello the same connection carries
// yamux, and after a stream header the stream carries its payload.
func readLine(r io.Reader, limit int) ([]byte, error) {
	var line []byte
	var b [1]byte
	for {
		n, err := r.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				return line, nil
			}
			if len(line) >= limit {
				return nil, fmt.Errorf("line longer than %d bytes: %q…", limit, preview(line))
			}
			line = append(line, b[0])
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				return nil, fmt.Errorf("connection ended inside a line: %q: %w", preview(line), io.ErrUnexpectedEOF)
			}
			return nil, err
		}
	}
}

// preview shortens peer-supplied bytes for error messages.
func preview(b []byte) string {
	const n = 120
	if len(b) > n {
		return string(b[:n])
	}
	return string(b)
}

// writeLine writes v as one JSON line in a single Write.
func writeLine(w io.Writer, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

func readJSONLine(r io.Reader, v any) error {
	line, err := readLine(r, maxLine)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("decode %q: %w", preview(line), err)
	}
	return nil
}

// frameWriter writes JSON frames, one per line, from concurrent callers.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (f *frameWriter) write(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(data) >= maxFrame {
		return fmt.Errorf("frame of %d bytes exceeds the %d byte limit", len(data), maxFrame)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err = f.w.Write(append(data, '\n'))
	return err
}

// frameReader reads JSON frames of at most maxFrame bytes.
type frameReader struct {
	br *bufio.Reader
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{br: bufio.NewReaderSize(r, 64<<10)}
}

func (f *frameReader) read(v any) error {
	var buf bytes.Buffer
	for {
		chunk, err := f.br.ReadSlice('\n')
		if buf.Len()+len(chunk) > maxFrame {
			return fmt.Errorf("frame exceeds the %d byte limit", maxFrame)
		}
		buf.Write(chunk)
		if err == nil {
			break
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if errors.Is(err, io.EOF) && buf.Len() > 0 {
			return fmt.Errorf("stream ended inside a frame: %w", io.ErrUnexpectedEOF)
		}
		return err
	}
	if err := json.Unmarshal(buf.Bytes(), v); err != nil {
		return fmt.Errorf("decode frame %q: %w", preview(buf.Bytes()), err)
	}
	return nil
}

// muxConfig tunes yamux for a slow guest: a TCG guest on an overloaded
// host can stall for a while and recover, and writes or stream opens that
// wait behind it must not fail the build. A guest that is gone for good
// needs no keepalive to be noticed: its QEMU exits and the socket closes.
// A frozen one is the host's watchdog's business (Host.Unresponsive),
// which says so in its error; yamux's keepalive here is only the agent's
// last resort against a host that froze.
func muxConfig(log *muxLogger) *yamux.Config {
	c := yamux.DefaultConfig()
	c.KeepAliveInterval = 30 * time.Second
	c.ConnectionWriteTimeout = 3 * time.Minute
	c.StreamOpenTimeout = 3 * time.Minute
	c.StreamCloseTimeout = 3 * time.Minute
	c.LogOutput = nil
	c.Logger = log
	return c
}

// muxLogger routes yamux's own log lines to slog at debug level: they are
// about connection teardown, which Serve and Accept report as errors. It
// keeps the last one, which says why yamux ended a session.
type muxLogger struct {
	log  *slog.Logger
	last atomic.Pointer[string]
}

func (l *muxLogger) Print(v ...any) { l.record(fmt.Sprint(v...)) }
func (l *muxLogger) Printf(format string, v ...any) {
	l.record(fmt.Sprintf(format, v...))
}

func (l *muxLogger) record(msg string) {
	msg = strings.TrimSpace(msg)
	l.last.Store(&msg)
	l.log.Debug(msg)
}

// lastLine is yamux's last complaint, "" if none.
func (l *muxLogger) lastLine() string {
	if p := l.last.Load(); p != nil {
		return *p
	}
	return ""
}

func (l *muxLogger) Println(v ...any) { l.record(fmt.Sprintln(v...)) }

// untilDone runs fn, closing c if ctx ends first so a blocked read or write
// on c returns. It reports ctx's error in that case.
func untilDone(ctx context.Context, c io.Closer, fn func() error) error {
	stop := context.AfterFunc(ctx, func() { closeNow(c) })
	err := fn()
	if !stop() && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}
