package solve

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/moby/buildkit/client"
	digest "github.com/opencontainers/go-digest"

	"github.com/kiln-build/kiln/internal/progress"
)

// tracker turns BuildKit's SolveStatus stream, which repeats a vertex every
// time any of its fields changes, into one event per state change and counts
// the steps for Result.
type tracker struct {
	sink progress.Sink
	red  *redactor

	mu       sync.Mutex
	stopped  bool
	vertices map[digest.Digest]*vertexState
	total    int
	cached   int
	spans    map[string]*span // Result.Timings name → when it ran
	// tails keeps the last log lines of each step, and failed the step
	// that failed first, for the failure recap.
	tails  map[digest.Digest][]string
	failed digest.Digest
}

// tailLines is how many of a failed step's last log lines the recap shows.
const tailLines = 10

// keepTail adds a step's log data to its tail.
func (t *tracker) keepTail(v digest.Digest, data string) {
	lines := append(t.tails[v], strings.Split(strings.TrimRight(data, "\n"), "\n")...)
	if len(lines) > tailLines {
		lines = append([]string(nil), lines[len(lines)-tailLines:]...)
	}
	t.tails[v] = lines
}

// recap is what a failed build shows first, as buildx does: the failing
// step and its last log lines.
func (t *tracker) recap() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.vertices[t.failed]
	if t.failed == "" || !ok {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "------\n > %s:\n", st.name)
	for _, l := range t.tails[t.failed] {
		fmt.Fprintf(&b, "%s\n", l)
	}
	b.WriteString("------\n")
	return b.String()
}

// span is the first start and last end seen of one timing.
type span struct{ start, end time.Time }

func (t *tracker) observe(name string, started, completed *time.Time) {
	if started == nil {
		return
	}
	sp := t.spans[name]
	if sp == nil {
		sp = &span{start: *started}
		t.spans[name] = sp
	}
	if started.Before(sp.start) {
		sp.start = *started
	}
	if completed != nil && completed.After(sp.end) {
		sp.end = *completed
	}
}

// timing names the Result.Timings entry a vertex counts towards.
func timing(vertexName string) string {
	switch {
	case vertexName == "[internal] load build context":
		return TimingContext
	case strings.HasPrefix(vertexName, "exporting to image"):
		return TimingExport
	}
	return ""
}

type vertexState struct {
	name     string
	started  bool
	finished bool // completed or cached; counted once
	errored  bool
}

func newTracker(sink progress.Sink, red *redactor) *tracker {
	return &tracker{sink: sink, red: red, vertices: map[digest.Digest]*vertexState{}, spans: map[string]*span{},
		tails: map[digest.Digest][]string{}}
}

// stop makes later status updates count nothing and emit nothing, so a sink
// is never called after Run returned.
func (t *tracker) stop() {
	t.mu.Lock()
	t.stopped = true
	t.mu.Unlock()
}

func (t *tracker) result() Result {
	t.mu.Lock()
	defer t.mu.Unlock()
	res := Result{StepsTotal: t.total, StepsCached: t.cached}
	for name, sp := range t.spans {
		if sp.end.After(sp.start) {
			if res.Timings == nil {
				res.Timings = map[string]time.Duration{}
			}
			res.Timings[name] = sp.end.Sub(sp.start)
		}
	}
	// The push runs inside the export step; count it once.
	if push, ok := res.Timings[TimingPush]; ok && res.Timings[TimingExport] > push {
		res.Timings[TimingExport] -= push
	}
	return res
}

func (t *tracker) handle(s *client.SolveStatus) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	for _, v := range s.Vertexes {
		t.vertex(v)
	}
	for _, st := range s.Statuses {
		if strings.HasPrefix(st.ID, "pushing ") {
			t.observe(TimingPush, st.Started, st.Completed)
		}
	}
	for _, l := range s.Logs {
		if len(l.Data) == 0 {
			continue
		}
		name := ""
		if st, ok := t.vertices[l.Vertex]; ok {
			name = st.name
		}
		data := t.red.apply(string(l.Data))
		t.keepTail(l.Vertex, data)
		t.emit(progress.Event{
			Kind:   progress.Log,
			Time:   l.Timestamp,
			Vertex: l.Vertex.String(),
			Name:   name,
			Stream: l.Stream,
			Data:   data,
		})
	}
	for _, w := range s.Warnings {
		t.emit(progress.Event{
			Kind:    progress.Message,
			Time:    time.Now(),
			Vertex:  w.Vertex.String(),
			Message: t.red.apply("warning: " + strings.TrimSpace(string(w.Short))),
		})
	}
}

func (t *tracker) vertex(v *client.Vertex) {
	st, ok := t.vertices[v.Digest]
	if !ok {
		st = &vertexState{}
		t.vertices[v.Digest] = st
	}
	if v.Name != "" {
		st.name = v.Name
	}
	if name := timing(st.name); name != "" {
		t.observe(name, v.Started, v.Completed)
	}
	base := progress.Event{Vertex: v.Digest.String(), Name: st.name}
	at := func(p *time.Time) time.Time {
		if p != nil {
			return *p
		}
		return time.Now()
	}

	if v.Started != nil && !st.started {
		st.started = true
		e := base
		e.Kind, e.Time = progress.VertexStarted, *v.Started
		t.emit(e)
	}
	switch {
	case v.Error != "":
		if !st.errored {
			st.errored = true
			if t.failed == "" && !strings.Contains(v.Error, "context canceled") {
				t.failed = v.Digest
			}
			e := base
			e.Kind, e.Time, e.Error = progress.VertexErrored, at(v.Completed), t.red.apply(v.Error)
			t.emit(e)
		}
	case v.Cached:
		if !st.finished {
			st.finished = true
			t.total++
			t.cached++
			e := base
			e.Kind, e.Time = progress.VertexCached, at(v.Completed)
			t.emit(e)
		}
	case v.Completed != nil:
		if !st.finished {
			st.finished = true
			t.total++
			e := base
			e.Kind, e.Time = progress.VertexCompleted, *v.Completed
			t.emit(e)
		}
	}
}

func (t *tracker) emit(e progress.Event) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	t.sink.Emit(e)
}

// redactor masks secret values in anything that leaves the solve as text:
// a RUN step that prints a secret must not put it into stored build logs.
type redactor struct {
	r *strings.Replacer
}

// minRedactLen skips very short secrets, which would mangle unrelated log
// text while protecting nothing.
const minRedactLen = 4

func newRedactor(secrets map[string][]byte) *redactor {
	var vals []string
	for _, v := range secrets {
		if len(v) >= minRedactLen {
			vals = append(vals, string(v))
		}
	}
	if len(vals) == 0 {
		return &redactor{}
	}
	// Longest first, so a secret containing another is masked whole.
	sort.Slice(vals, func(i, j int) bool { return len(vals[i]) > len(vals[j]) })
	pairs := make([]string, 0, 2*len(vals))
	for _, v := range vals {
		pairs = append(pairs, v, "****")
	}
	return &redactor{r: strings.NewReplacer(pairs...)}
}

func (r *redactor) apply(s string) string {
	if r == nil || r.r == nil {
		return s
	}
	return r.r.Replace(s)
}
