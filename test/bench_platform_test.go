package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// BenchmarkEmulatedArm64StepOverNative runs the same CPU-bound RUN step
// for linux/amd64 (native) and linux/arm64 (QEMU user-mode emulation) on
// one server and reports the step times from BuildKit's own vertex
// events, and their ratio: what emulation costs a user's arm64 build.
func BenchmarkEmulatedArm64StepOverNative(b *testing.B) {
	s := startServer(b)
	base := s.multiBase()
	df := fmt.Sprintf(`FROM %s
ARG N
RUN i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo "$N" > /n
`, base)
	took := map[string]time.Duration{}
	for i := 0; i < b.N; i++ {
		for _, p := range []string{"linux/amd64", "linux/arm64"} {
			bd := mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": df},
				fields: [][2]string{{"platform", p}, {"build_args", fmt.Sprintf(`{"N":"%d-%d"}`, i, time.Now().UnixNano())}}}))
			took[p] += s.stepTime(s.admin, bd.Id, "while [")
		}
	}
	n := float64(b.N)
	b.ReportMetric(took["linux/amd64"].Seconds()*1000/n, "native-ms/op")
	b.ReportMetric(took["linux/arm64"].Seconds()*1000/n, "emulated-ms/op")
	b.ReportMetric(took["linux/arm64"].Seconds()/took["linux/amd64"].Seconds(), "emulated/native")
}

// stepTime is how long the build's step whose name contains marker ran,
// from its vertex.started to its vertex.completed event.
func (s *server) stepTime(token, id, marker string) time.Duration {
	s.t.Helper()
	req, _ := http.NewRequest("GET", s.url("/v1/builds/"+id+"/events"), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var started, completed time.Time
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var e struct {
			Kind string    `json:"kind"`
			Time time.Time `json:"time"`
			Name string    `json:"name"`
		}
		if json.Unmarshal([]byte(data), &e) != nil {
			continue
		}
		switch {
		case e.Kind == "end":
			if started.IsZero() || completed.IsZero() {
				s.t.Fatalf("build %s: no started and completed events for the step %q", id, marker)
			}
			return completed.Sub(started)
		case !strings.Contains(e.Name, marker):
		case e.Kind == "vertex.started":
			started = e.Time
		case e.Kind == "vertex.completed":
			completed = e.Time
		}
	}
	s.t.Fatalf("build %s: the event stream ended without its end event", id)
	return 0
}
