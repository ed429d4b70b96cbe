package cli

import (
	"fmt"
	"strings"

	"github.com/kiln-build/kiln/api"
)

// logLines renders one build event the way the server's plain-text log
// (GET /v1/builds/{id}/logs) renders it, so `kiln builds logs` and
// `kiln builds logs -f` print the same lines: "15:04:05 | output" for
// step output, "15:04:05 [phase] solving", "15:04:05 CACHED [2/3] RUN …".
// It must stay in step with logLine in internal/server/builds.go; the
// e2e test TestListsBuildLogs compares the two.
func logLines(e api.Event) string {
	ts := e.Time.UTC().Format("15:04:05")
	switch e.Kind {
	case "phase":
		return fmt.Sprintf("%s [phase] %s\n", ts, str(e.Phase))
	case "status":
		return fmt.Sprintf("%s [status] %s\n", ts, str(e.Status))
	case "message":
		return fmt.Sprintf("%s [kiln] %s\n", ts, str(e.Message))
	case "vertex.started":
		return fmt.Sprintf("%s %s\n", ts, str(e.Name))
	case "vertex.cached":
		return fmt.Sprintf("%s CACHED %s\n", ts, str(e.Name))
	case "vertex.errored":
		return fmt.Sprintf("%s ERROR %s: %s\n", ts, str(e.Name), str(e.Error))
	case "log":
		var b strings.Builder
		for _, l := range strings.SplitAfter(str(e.Data), "\n") {
			if l == "" {
				continue
			}
			if !strings.HasSuffix(l, "\n") {
				l += "\n"
			}
			b.WriteString(ts + " | " + l)
		}
		return b.String()
	}
	return ""
}

// lastLines keeps the last n lines written to it (all of them when
// n < 0) and counts the complete lines.
type lastLines struct {
	n     int
	lines []string
	part  string // an unfinished last line
	total int    // complete lines written
}

func (l *lastLines) Write(p []byte) (int, error) {
	s := l.part + string(p)
	l.part = ""
	for {
		i := strings.IndexByte(s, '\n')
		if i < 0 {
			l.part = s
			break
		}
		l.lines = append(l.lines, s[:i+1])
		l.total++
		s = s[i+1:]
		if l.n >= 0 && len(l.lines) > 2*l.n+64 {
			l.lines = append(l.lines[:0], l.lines[len(l.lines)-l.n:]...)
		}
	}
	return len(p), nil
}

// tail returns the last n lines, an unfinished last one included.
func (l *lastLines) tail() []string {
	out := l.lines
	if l.part != "" {
		out = append(out, l.part)
	}
	if l.n >= 0 && len(out) > l.n {
		out = out[len(out)-l.n:]
	}
	return out
}
