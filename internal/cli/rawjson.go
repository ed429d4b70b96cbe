package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/kiln-build/kiln/api"
)

// The types below are BuildKit's client.SolveStatus and its parts with the
// same JSON field names (github.com/moby/buildkit/client/graph.go), which
// is what `docker buildx build --progress rawjson` prints: one SolveStatus
// per line. They are copied rather than imported to keep BuildKit's client
// out of the CLI's dependencies.
type rawSolveStatus struct {
	Vertexes []*rawVertex        `json:"vertexes,omitempty"`
	Statuses []*rawVertexStatus  `json:"statuses,omitempty"`
	Logs     []*rawVertexLog     `json:"logs,omitempty"`
	Warnings []*rawVertexWarning `json:"warnings,omitempty"`
}

type rawVertex struct {
	Digest    string     `json:"digest,omitempty"`
	Inputs    []string   `json:"inputs,omitempty"`
	Name      string     `json:"name,omitempty"`
	Started   *time.Time `json:"started,omitempty"`
	Completed *time.Time `json:"completed,omitempty"`
	Cached    bool       `json:"cached,omitempty"`
	Error     string     `json:"error,omitempty"`
}

type rawVertexStatus struct {
	ID        string     `json:"id"`
	Vertex    string     `json:"vertex,omitempty"`
	Name      string     `json:"name,omitempty"`
	Total     int64      `json:"total,omitempty"`
	Current   int64      `json:"current"`
	Timestamp time.Time  `json:"timestamp"`
	Started   *time.Time `json:"started,omitempty"`
	Completed *time.Time `json:"completed,omitempty"`
}

type rawVertexLog struct {
	Vertex    string    `json:"vertex,omitempty"`
	Stream    int       `json:"stream,omitempty"`
	Data      []byte    `json:"data"` // base64, as encoding/json writes []byte
	Timestamp time.Time `json:"timestamp"`
}

type rawVertexWarning struct {
	Vertex string   `json:"vertex,omitempty"`
	Level  int      `json:"level,omitempty"`
	Short  []byte   `json:"short,omitempty"`
	Detail [][]byte `json:"detail,omitempty"`
	URL    string   `json:"url,omitempty"`
}

// rawJSONDisplay turns kiln's events back into BuildKit's SolveStatus
// stream: each vertex event becomes the vertex's whole current state (as
// BuildKit sends it), each log chunk a log entry. kiln's own phases and
// messages have no place in that shape and are left out; notes about the
// connection go out as "kiln: ..." lines, as in the other modes.
type rawJSONDisplay struct {
	enc    *json.Encoder
	errOut io.Writer
	vs     map[string]*rawVertex
}

func newRawJSONDisplay(out, errOut io.Writer) *rawJSONDisplay {
	return &rawJSONDisplay{enc: json.NewEncoder(out), errOut: errOut, vs: map[string]*rawVertex{}}
}

func (d *rawJSONDisplay) vertex(ev api.Event) *rawVertex {
	dg := str(ev.Vertex)
	v, ok := d.vs[dg]
	if !ok {
		v = &rawVertex{Digest: dg}
		d.vs[dg] = v
	}
	if n := str(ev.Name); n != "" {
		v.Name = n
	}
	return v
}

func (d *rawJSONDisplay) event(ev api.Event, _ []byte) {
	at := ev.Time
	switch ev.Kind {
	case "vertex.started":
		v := d.vertex(ev)
		v.Started = &at
	case "vertex.cached":
		v := d.vertex(ev)
		v.Cached = true
		if v.Started == nil {
			v.Started = &at
		}
		v.Completed = &at
	case "vertex.completed":
		v := d.vertex(ev)
		if v.Started == nil {
			v.Started = &at
		}
		v.Completed = &at
	case "vertex.errored":
		v := d.vertex(ev)
		if v.Started == nil {
			v.Started = &at
		}
		v.Completed = &at
		v.Error = str(ev.Error)
	case "log":
		stream := 1
		if ev.Stream != nil {
			stream = *ev.Stream
		}
		d.write(rawSolveStatus{Logs: []*rawVertexLog{{Vertex: str(ev.Vertex), Stream: stream, Data: []byte(str(ev.Data)), Timestamp: at}}})
		return
	default:
		return
	}
	v := *d.vs[str(ev.Vertex)]
	d.write(rawSolveStatus{Vertexes: []*rawVertex{&v}})
}

func (d *rawJSONDisplay) write(s rawSolveStatus) { _ = d.enc.Encode(s) }

func (d *rawJSONDisplay) note(msg string)     { fmt.Fprintf(d.errOut, "kiln: %s\n", msg) }
func (d *rawJSONDisplay) polled(b *api.Build) {}
func (d *rawJSONDisplay) close()              {}

// quietDisplay shows nothing: --progress quiet and -q.
type quietDisplay struct{}

func (quietDisplay) event(api.Event, []byte) {}
func (quietDisplay) note(string)             {}
func (quietDisplay) polled(*api.Build)       {}
func (quietDisplay) close()                  {}
