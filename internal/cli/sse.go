package cli

import (
	"bufio"
	"bytes"
	"io"
	"strings"
)

// sseEvent is one dispatched Server-Sent Event.
type sseEvent struct {
	id    string // the id field of this event, "" if it had none
	event string
	data  []byte
}

// sseReader parses a text/event-stream as the HTML standard describes it:
// lines end in LF, CRLF or CR; "field: value" lines accumulate into an event
// that a blank line dispatches; lines starting with ":" are comments (the
// server's heartbeat). An event cut off by the end of the stream is dropped,
// never half-delivered, which is what makes resuming after it exact.
type sseReader struct {
	sc *bufio.Scanner
}

// maxSSELine bounds one line (a log chunk is one data line); a longer line
// is an error rather than unbounded memory.
const maxSSELine = 16 << 20

func newSSEReader(r io.Reader) *sseReader {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxSSELine)
	sc.Split(scanSSELines)
	return &sseReader{sc: sc}
}

// next returns the next complete event. At the end of the stream it returns
// io.EOF (or the read error), discarding any unterminated event.
func (r *sseReader) next() (sseEvent, error) {
	var (
		ev      sseEvent
		data    bytes.Buffer
		hasData bool
	)
	for r.sc.Scan() {
		line := r.sc.Text()
		if line == "" {
			if !hasData {
				// An event with no data is not dispatched (the spec); reset.
				ev, hasData = sseEvent{}, false
				continue
			}
			ev.data = bytes.TrimSuffix(data.Bytes(), []byte("\n"))
			return ev, nil
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "data":
			data.WriteString(value)
			data.WriteByte('\n')
			hasData = true
		case "event":
			ev.event = value
		case "id":
			if !strings.ContainsRune(value, 0) {
				ev.id = value
			}
		}
		// "retry" and unknown fields are ignored: the client's own backoff
		// governs reconnects.
	}
	if err := r.sc.Err(); err != nil {
		return sseEvent{}, err
	}
	return sseEvent{}, io.EOF
}

// scanSSELines is bufio.ScanLines for the three line endings of SSE.
func scanSSELines(data []byte, atEOF bool) (advance int, token []byte, err error) {
	for i, b := range data {
		switch b {
		case '\n':
			return i + 1, data[:i], nil
		case '\r':
			if i+1 < len(data) {
				if data[i+1] == '\n' {
					return i + 2, data[:i], nil
				}
				return i + 1, data[:i], nil
			}
			if atEOF {
				return i + 1, data[:i], nil
			}
			// A CR at the end of the buffer may be the first half of CRLF.
			return 0, nil, nil
		}
	}
	if atEOF && len(data) > 0 {
		// An unterminated last line cannot complete an event (that needs a
		// blank line after it), so handing it over is harmless.
		return len(data), data, nil
	}
	return 0, nil, nil
}
