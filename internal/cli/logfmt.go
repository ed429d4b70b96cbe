package cli

import (
	"strings"
)

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
