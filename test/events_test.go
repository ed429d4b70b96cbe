package test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

type sseEvent struct {
	id   int64
	kind string
	data string
}

// readSSE reads events from a stream until max events were read (then it
// drops the connection) or the stream ends.
func readSSE(t *testing.T, s *server, token, id string, lastID int64, max int) ([]sseEvent, bool) {
	t.Helper()
	req, _ := http.NewRequest("GET", s.url("/v1/builds/"+id+"/events"), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	if lastID > 0 {
		req.Header.Set("Last-Event-ID", strconv.FormatInt(lastID, 10))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close() // dropping the connection mid-stream
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("events: status %d type %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var out []sseEvent
	var cur sseEvent
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if cur.kind != "" {
				out = append(out, cur)
				if cur.kind == "end" {
					return out, true
				}
				if len(out) == max {
					return out, false
				}
			}
			cur = sseEvent{}
		case strings.HasPrefix(line, "id: "):
			cur.id, _ = strconv.ParseInt(line[4:], 10, 64)
		case strings.HasPrefix(line, "event: "):
			cur.kind = line[7:]
		case strings.HasPrefix(line, "data: "):
			cur.data = line[6:]
		}
	}
	return out, false
}

func TestEventStreamResumesWithoutLossOrDuplicates(t *testing.T) {
	s := startServer(t)
	base := s.base()
	b := s.build(s.admin, submission{files: map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
RUN for i in 1 2 3 4 5 6 7 8; do echo line-$i; sleep 0.3; done
RUN echo done
`, base)}})

	// Read a few events at a time, dropping the connection each time and
	// resuming from the last id seen.
	var got []sseEvent
	var last int64
	for round := 0; round < 200; round++ {
		evs, ended := readSSE(t, s, s.admin, b.Id, last, 3)
		got = append(got, evs...)
		if len(evs) > 0 {
			last = evs[len(evs)-1].id
		}
		if ended {
			break
		}
	}
	if len(got) == 0 || got[len(got)-1].kind != "end" {
		t.Fatalf("stream never ended; got %d events", len(got))
	}
	for i := 1; i < len(got); i++ {
		if got[i].id != got[i-1].id+1 {
			t.Fatalf("event ids not contiguous at %d: %d then %d", i, got[i-1].id, got[i].id)
		}
	}
	// A finished build replays the same events in one go.
	replay, ended := readSSE(t, s, s.admin, b.Id, 0, 100000)
	if !ended || len(replay) != len(got) {
		t.Fatalf("replay has %d events (ended %v), resumed read had %d", len(replay), ended, len(got))
	}
	for i := range replay {
		if replay[i] != got[i] {
			t.Fatalf("event %d differs: %+v vs %+v", i, replay[i], got[i])
		}
	}
	// The stream carries structured progress and ends with the build.
	kinds := map[string]int{}
	logLines := 0
	for _, e := range got {
		kinds[e.kind]++
		if e.kind == "log" && strings.Contains(e.data, "line-") {
			logLines++
		}
	}
	for _, k := range []string{"status", "phase", "vertex.started", "vertex.completed", "log", "end"} {
		if kinds[k] == 0 {
			t.Errorf("no %s events in %v", k, kinds)
		}
	}
	if logLines == 0 {
		t.Errorf("no log events carried the RUN output")
	}
	var end api.Event
	json.Unmarshal([]byte(got[len(got)-1].data), &end)
	if end.Build == nil || end.Build.Status != api.BuildStatusSucceeded || end.Build.ImageDigest == nil {
		t.Errorf("end event does not carry the succeeded build: %s", got[len(got)-1].data)
	}
}

func TestServerKilledMidBuildRerunsIt(t *testing.T) {
	s := startServer(t)
	base := s.base()
	b := s.build(s.admin, submission{files: map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
RUN sleep 6 && echo finished > /f
`, base)}})
	s.waitStatus(s.admin, b.Id, api.BuildStatusRunning, time.Minute)
	time.Sleep(2 * time.Second)
	s.kill9()

	s.start(s.addr) // same data dir, same address
	final := mustSucceed(t, s, s.admin, api.Build{Id: b.Id})
	if final.ImageDigest == nil {
		t.Fatalf("rerun build has no digest")
	}
	log := s.logText(s.admin, b.Id)
	if !strings.Contains(log, "restarted while this build was running") {
		t.Errorf("log does not say the build was rerun after a restart:\n%s", log)
	}
	var running api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds?status=running", nil, http.StatusOK, &running)
	if len(running.Builds) != 0 {
		t.Errorf("builds still running after restart: %+v", running.Builds)
	}
}

func TestSecretsAreServedButNeverStored(t *testing.T) {
	s := startServer(t)
	base := s.base()
	const secret = "s3cr3t-value-9f8e7d"
	// The build compares the secret with its hash, so the value itself is
	// nowhere in the Dockerfile or the build args.
	sum := sha256.Sum256([]byte(secret))
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{
		files: map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
ARG WANT
RUN --mount=type=secret,id=npm test "$(sha256sum /run/secrets/npm | cut -d' ' -f1)" = "$WANT" && echo secret-ok
RUN --mount=type=secret,id=npm echo "careless step prints: $(cat /run/secrets/npm)"
`, base)},
		fields:  [][2]string{{"build_args", fmt.Sprintf(`{"WANT":%q}`, hex.EncodeToString(sum[:]))}},
		secrets: map[string]string{"npm": secret},
	}))
	log := s.logText(s.admin, b.Id)
	if !strings.Contains(log, "secret-ok") || !strings.Contains(log, "careless step prints") {
		t.Fatalf("the secret was not served to RUN:\n%s", log)
	}
	if strings.Contains(log, secret) || strings.Contains(s.logs(), secret) {
		t.Errorf("secret value leaked into logs")
	}
	if out := grepTree(t, s.data, secret); out != "" {
		t.Errorf("secret value found on disk: %s", out)
	}
}

func TestEventStreamSendsHeartbeats(t *testing.T) {
	s := startServer(t, withArgs("--sse-heartbeat", "300ms"))
	base := s.base()
	b := s.build(s.admin, submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 3\n", base)}})
	req, _ := http.NewRequest("GET", s.url("/v1/builds/"+b.Id+"/events"), nil)
	req.Header.Set("Authorization", "Bearer "+s.admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	beats := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if sc.Text() == ": heartbeat" {
			beats++
		}
		if sc.Text() == "event: end" {
			break
		}
	}
	if beats < 2 {
		t.Errorf("saw %d heartbeats during a 3 s quiet step with a 300 ms heartbeat", beats)
	}
}
