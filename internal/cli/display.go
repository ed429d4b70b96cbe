package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/term"

	"github.com/kiln-build/kiln/api"
)

// display shows a build's events as they arrive.
type display interface {
	event(ev api.Event, raw []byte)
	// note is something the client itself has to say (reconnecting,
	// polling); polled is a build state learned by polling.
	note(msg string)
	polled(b *api.Build)
	// close stops any live redrawing and leaves the final picture.
	close()
}

// Progress modes of --progress.
const (
	progressAuto  = "auto"
	progressTTY   = "tty"
	progressPlain = "plain"
	progressJSON  = "json"
	// progressQuiet shows nothing (-q implies it).
	progressQuiet = "quiet"
	// progressRawJSON is BuildKit's SolveStatus stream, one JSON object
	// per line, as `docker buildx build --progress rawjson` prints it.
	progressRawJSON = "rawjson"
)

// progressModes are the values --progress takes, for its messages.
const progressModes = "auto, tty, plain, quiet, rawjson or json"

// silentProgress reports the modes whose stderr carries nothing but the
// progress itself (none at all for quiet), for programs to read: kiln's
// notes about the build (queued, the context's summary, the outcome) are
// left out. Only kiln's own warnings and errors, "kiln: ..." lines, remain.
func silentProgress(mode string) bool {
	return mode == progressJSON || mode == progressRawJSON || mode == progressQuiet
}

// terminalOf returns w's file descriptor if w is a terminal, looking
// through wrappers that have an Unwrap() io.Writer.
func terminalOf(w io.Writer) (fd int, ok bool) {
	for {
		u, isWrapper := w.(interface{ Unwrap() io.Writer })
		if !isWrapper {
			break
		}
		w = u.Unwrap()
	}
	f, isFile := w.(*os.File)
	if !isFile || !term.IsTerminal(int(f.Fd())) {
		return 0, false
	}
	return int(f.Fd()), true
}

// resolveProgress turns auto into tty or plain by looking at out, where
// progress goes (standard error, as with buildx).
func resolveProgress(mode string, out io.Writer) string {
	if mode != progressAuto {
		return mode
	}
	if _, ok := terminalOf(out); ok && os.Getenv("TERM") != "dumb" {
		return progressTTY
	}
	return progressPlain
}

// newDisplay returns the display of mode, drawing on out; the client's
// own notes go to errOut.
func newDisplay(mode string, out, errOut io.Writer, s settings) display {
	switch mode {
	case progressJSON:
		return &jsonDisplay{out: out, errOut: errOut}
	case progressRawJSON:
		return newRawJSONDisplay(out, errOut)
	case progressQuiet:
		return quietDisplay{}
	case progressTTY:
		return newTTYDisplay(out, s.redraw)
	}
	return newPlainDisplay(out, errOut)
}

// vertex is what the displays remember about one build step.
type vertex struct {
	num     int
	name    string
	started time.Time // server clock, for durations
	local   time.Time // client clock at the started event, for live timers
	ended   time.Time
	cached  bool
	done    bool
	err     string
	logs    []string     // last lines, for the tty view
	partial bytes.Buffer // an unterminated log line
}

// took is the step's duration by the server's clock, "" if unknown.
func (v *vertex) took() string {
	if v.started.IsZero() || v.ended.IsZero() {
		return ""
	}
	return seconds(v.ended.Sub(v.started))
}

func (v *vertex) running() bool { return !v.local.IsZero() && !v.done && !v.cached && v.err == "" }

// vertices numbers steps in the order they first appear, like BuildKit's
// "#3" prefixes.
type vertices struct {
	order    []*vertex
	byDigest map[string]*vertex
}

func (vs *vertices) get(digest, name string) *vertex {
	if vs.byDigest == nil {
		vs.byDigest = map[string]*vertex{}
	}
	v, ok := vs.byDigest[digest]
	if !ok {
		v = &vertex{num: len(vs.order) + 1}
		vs.byDigest[digest] = v
		vs.order = append(vs.order, v)
	}
	if name != "" {
		v.name = name
	}
	return v
}

// lines splits a log chunk into complete lines, keeping an unterminated
// tail in v.partial for the next chunk.
func (v *vertex) lines(data string) []string {
	v.partial.WriteString(data)
	buf := v.partial.String()
	i := strings.LastIndexByte(buf, '\n')
	if i < 0 {
		return nil
	}
	out := strings.Split(buf[:i], "\n")
	v.partial.Reset()
	v.partial.WriteString(buf[i+1:])
	for j := range out {
		out[j] = strings.TrimSuffix(out[j], "\r")
	}
	return out
}

// flush returns the unterminated tail, if any.
func (v *vertex) flush() []string {
	if v.partial.Len() == 0 {
		return nil
	}
	s := strings.TrimSuffix(v.partial.String(), "\r")
	v.partial.Reset()
	return []string{s}
}

func str(p *string) string { return deref(p) }

// plainDisplay prints one line per event, in BuildKit's plain style.
type plainDisplay struct {
	out, errOut io.Writer
	vs          vertices
	named       map[*vertex]bool
}

func newPlainDisplay(out, errOut io.Writer) *plainDisplay {
	return &plainDisplay{out: out, errOut: errOut, named: map[*vertex]bool{}}
}

func (d *plainDisplay) printf(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

// announce prints the step's name once, before anything else about it.
func (d *plainDisplay) announce(v *vertex) {
	if !d.named[v] && v.name != "" {
		d.named[v] = true
		d.printf("#%d %s", v.num, v.name)
	}
}

func (d *plainDisplay) logLines(v *vertex, at time.Time, lines []string) {
	for _, l := range lines {
		if v == nil {
			d.printf("#0 %s", l)
			continue
		}
		if v.started.IsZero() {
			d.printf("#%d %s", v.num, l)
			continue
		}
		d.printf("#%d %.3f %s", v.num, at.Sub(v.started).Seconds(), l)
	}
}

func (d *plainDisplay) event(ev api.Event, _ []byte) {
	switch ev.Kind {
	case "phase":
		d.printf("phase: %s", str(ev.Phase))
	case "status":
		d.printf("status: %s", str(ev.Status))
	case "message":
		d.printf("kiln: %s", str(ev.Message))
	case "vertex.started":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.started, v.local = ev.Time, time.Now()
		d.announce(v)
	case "vertex.cached":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.cached = true
		d.announce(v)
		d.printf("#%d CACHED", v.num)
	case "vertex.completed":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		d.announce(v)
		d.logLines(v, ev.Time, v.flush())
		v.done = true
		if v.started.IsZero() {
			d.printf("#%d DONE", v.num)
		} else {
			d.printf("#%d DONE %s", v.num, seconds(ev.Time.Sub(v.started)))
		}
	case "vertex.errored":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		d.announce(v)
		d.logLines(v, ev.Time, v.flush())
		v.err = str(ev.Error)
		d.printf("#%d ERROR: %s", v.num, v.err)
	case "log":
		if str(ev.Vertex) == "" {
			d.logLines(nil, ev.Time, strings.Split(strings.TrimSuffix(str(ev.Data), "\n"), "\n"))
			return
		}
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		d.announce(v)
		d.logLines(v, ev.Time, v.lines(str(ev.Data)))
	case "end":
		// The command prints the outcome.
	default:
		d.printf("%s", ev.Kind)
	}
}

func (d *plainDisplay) note(msg string) { fmt.Fprintf(d.errOut, "kiln: %s\n", msg) }

func (d *plainDisplay) polled(b *api.Build) {
	d.printf("status: %s (phase %s)", b.Status, orDash(b.Phase))
}

func (d *plainDisplay) close() {
	for _, v := range d.vs.order {
		d.logLines(v, v.started, v.flush())
	}
}

// jsonDisplay prints every event exactly as received, one per line; the
// client's own notes are "kiln: ..." lines, which are not JSON.
type jsonDisplay struct {
	out, errOut io.Writer
}

func (d *jsonDisplay) event(ev api.Event, raw []byte) {
	var buf bytes.Buffer
	if json.Compact(&buf, raw) != nil {
		buf.Reset()
		b, _ := json.Marshal(ev)
		buf.Write(b)
	}
	buf.WriteByte('\n')
	d.out.Write(buf.Bytes())
}

func (d *jsonDisplay) note(msg string)     { fmt.Fprintf(d.errOut, "kiln: %s\n", msg) }
func (d *jsonDisplay) polled(b *api.Build) { d.note(fmt.Sprintf("build status: %s", b.Status)) }
func (d *jsonDisplay) close()              {}

// ttyDisplay is a buildx-like live view, repainted in place with ANSI
// escapes at most once per redraw interval.
type ttyDisplay struct {
	out      io.Writer
	fd       int
	isTerm   bool
	start    time.Time
	interval time.Duration

	mu       sync.Mutex
	vs       vertices
	phase    string
	status   string
	messages []string
	took     time.Duration // the build's own duration, once it ended
	painted  int           // lines of the last frame, to move back over
	dirty    bool
	closed   bool

	stop chan struct{}
	done chan struct{}
}

const (
	ttyLogLines     = 6 // log lines shown under a running step
	ttyErrLogLines  = 10
	ttyMessageLines = 5
)

func newTTYDisplay(out io.Writer, interval time.Duration) *ttyDisplay {
	d := &ttyDisplay{out: out, start: time.Now(), interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	d.fd, d.isTerm = terminalOf(out)
	go d.loop()
	return d
}

func (d *ttyDisplay) loop() {
	defer close(d.done)
	t := time.NewTicker(d.interval)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
			d.mu.Lock()
			if d.dirty || d.anyRunning() {
				d.paint(false)
			}
			d.mu.Unlock()
		}
	}
}

func (d *ttyDisplay) anyRunning() bool {
	for _, v := range d.vs.order {
		if v.running() {
			return true
		}
	}
	return false
}

func (d *ttyDisplay) event(ev api.Event, _ []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dirty = true
	switch ev.Kind {
	case "phase":
		d.phase = str(ev.Phase)
	case "status":
		d.status = str(ev.Status)
	case "message":
		d.addMessage("kiln: " + str(ev.Message))
	case "vertex.started":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.started, v.local = ev.Time, time.Now()
	case "vertex.cached":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.cached = true
	case "vertex.completed":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.done, v.ended = true, ev.Time
		v.logs = append(v.logs, v.flush()...)
	case "vertex.errored":
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.err, v.ended = str(ev.Error), ev.Time
		v.logs = append(v.logs, v.flush()...)
	case "log":
		if str(ev.Vertex) == "" {
			for _, l := range strings.Split(strings.TrimSuffix(str(ev.Data), "\n"), "\n") {
				d.addMessage(l)
			}
			return
		}
		v := d.vs.get(str(ev.Vertex), str(ev.Name))
		v.logs = append(v.logs, v.lines(str(ev.Data))...)
		if len(v.logs) > ttyErrLogLines {
			v.logs = v.logs[len(v.logs)-ttyErrLogLines:]
		}
	case "end":
		if b := ev.Build; b != nil {
			d.status = string(b.Status)
			if b.StartedAt != nil && b.FinishedAt != nil {
				d.took = b.FinishedAt.Sub(*b.StartedAt)
			}
		}
	}
}

func (d *ttyDisplay) addMessage(m string) {
	d.messages = append(d.messages, m)
	if len(d.messages) > ttyMessageLines {
		d.messages = d.messages[len(d.messages)-ttyMessageLines:]
	}
}

func (d *ttyDisplay) note(msg string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.addMessage("kiln: " + msg)
	d.dirty = true
}

func (d *ttyDisplay) polled(b *api.Build) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status, d.phase = string(b.Status), b.Phase
	d.dirty = true
}

func (d *ttyDisplay) close() {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	d.mu.Unlock()
	close(d.stop)
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	d.paint(true)
}

func (d *ttyDisplay) size() (width, height int) {
	if d.isTerm {
		if w, h, err := term.GetSize(d.fd); err == nil && w > 0 && h > 0 {
			return w, h
		}
	}
	return 80, 0
}

// paint redraws the frame over the previous one. The final frame shows
// every step and the logs of failed steps; live frames are cut to the
// terminal's height, since the cursor cannot move above the screen.
func (d *ttyDisplay) paint(final bool) {
	width, height := d.size()
	lines := d.frame(final, width)
	if !final && height > 2 && len(lines) > height-1 {
		lines = append(lines[:1], lines[len(lines)-(height-2):]...)
	}
	var buf bytes.Buffer
	if d.painted > 0 {
		fmt.Fprintf(&buf, "\x1b[%dA", d.painted)
	}
	for _, l := range lines {
		buf.WriteString("\r\x1b[2K")
		buf.WriteString(l)
		buf.WriteByte('\n')
	}
	buf.WriteString("\x1b[J")
	d.out.Write(buf.Bytes())
	d.painted = len(lines)
	d.dirty = false
}

func (d *ttyDisplay) frame(final bool, width int) []string {
	now := time.Now()
	finished := 0
	for _, v := range d.vs.order {
		if v.done || v.cached || v.err != "" {
			finished++
		}
	}
	elapsed := now.Sub(d.start)
	if final && d.took > 0 {
		// A replayed or reattached build: local time says nothing.
		elapsed = d.took
	}
	header := fmt.Sprintf("[+] Building %s (%d/%d)", seconds(elapsed), finished, len(d.vs.order))
	switch {
	case final && d.status != "":
		header += " " + strings.ToUpper(d.status)
	case d.phase != "":
		header += " " + d.phase
	case d.status != "":
		header += " " + d.status
	}
	lines := []string{fit(header, "", width)}
	for _, v := range d.vs.order {
		var prefix, dur string
		switch {
		case v.cached:
			prefix, dur = "CACHED ", seconds(0)
		case v.err != "":
			prefix, dur = "ERROR ", v.took()
		case v.done:
			dur = v.took()
		case !v.local.IsZero():
			dur = seconds(now.Sub(v.local))
		}
		lines = append(lines, fit(" => "+prefix+v.name, dur, width))
		var logs []string
		switch {
		case v.err != "":
			logs = v.logs
			lines = append(lines, fit(" => => ERROR: "+v.err, "", width))
		case v.running():
			logs = v.logs[max(0, len(v.logs)-ttyLogLines):]
		}
		if !final || v.err != "" {
			for _, l := range logs {
				lines = append(lines, fit(" => => # "+l, "", width))
			}
		}
	}
	for _, m := range d.messages {
		lines = append(lines, fit(" => "+m, "", width))
	}
	return lines
}

// fit lays out left and right on one line no wider than width-1 runes, so
// the terminal never wraps it (wrapping would break the line count the
// repaint relies on). Control characters in log lines are blanked for the
// same reason.
func fit(left, right string, width int) string {
	left = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, left)
	avail := width - 1
	rw := utf8.RuneCountInString(right)
	lw := utf8.RuneCountInString(left)
	if right != "" {
		if lw+1+rw > avail {
			left = truncate(left, max(0, avail-rw-1))
			lw = utf8.RuneCountInString(left)
		}
		return left + strings.Repeat(" ", max(1, avail-lw-rw)) + right
	}
	return truncate(left, avail)
}

func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	if n <= 1 {
		return string([]rune(s)[:n])
	}
	return string([]rune(s)[:n-1]) + "…"
}
