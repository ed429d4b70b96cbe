package api

import (
	"fmt"
	"strings"
)

// LogLine renders an event as a line of a build's plain-text log (GET
// /v1/builds/{id}/logs, kiln builds logs [-f]): "15:04:05 | output" for
// step output, "15:04:05 [phase] solving", "15:04:05 CACHED [2/3] RUN …";
// "" for events the log leaves out. Server and CLI share it, so the log
// reads the same fetched whole or followed.
func (e Event) LogLine() string {
	ts := e.Time.UTC().Format("15:04:05")
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
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
