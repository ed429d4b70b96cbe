package test

import (
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

func TestTimeoutFailsTheBuildAndMetricsCountIt(t *testing.T) {
	s := startServer(t, withArgs("--limits-timeout-seconds-max", "600", "--limits-timeout-seconds-default", "600"))
	base := s.base()
	b := s.wait(s.admin, s.build(s.admin, submission{
		files:  map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 120\n", base)},
		fields: [][2]string{{"timeout_seconds", "3"}},
	}).Id, 5*time.Minute)
	if b.Status != api.BuildStatusFailed || b.Error == nil || !strings.Contains(*b.Error, "timeout") {
		t.Fatalf("timed-out build: status %s error %v", b.Status, b.Error)
	}
	if d := b.FinishedAt.Sub(*b.StartedAt); d.Seconds() > 30 {
		t.Errorf("build ran %s despite a 3 s timeout", d)
	}
	assertNoLeftovers(t, s.data)

	code, body := s.submit(s.admin, submission{
		files:  map[string]string{"Dockerfile": "FROM scratch\n"},
		fields: [][2]string{{"timeout_seconds", "601"}},
	})
	if code != 400 || !strings.Contains(string(body), "limits.timeout_seconds") {
		t.Errorf("timeout over the cap: status %d %s", code, body)
	}

	resp, err := http.Get(s.url("/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	metrics, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`kiln_builds{status="failed"} 1`,
		`kiln_builds{status="succeeded"} 1`, // the base image
		`kiln_queue_length 0`,
		`kiln_build_duration_seconds_count 2`,
		`kiln_cache_volumes_used_bytes `,
		`kiln_cache_volumes 1`,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// /metrics answers without a token, so it names no scope (and so no
	// tenant).
	if strings.Contains(string(metrics), `scope="`) {
		t.Errorf("metrics name cache scopes:\n%s", metrics)
	}
}

func TestConfigOverTheHostIsAStartupError(t *testing.T) {
	out, err := exec.Command(kilnBinary(t), "serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0",
		"--limits-cpus-max", "4096").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "limits.cpus.max") {
		t.Errorf("kiln serve with more CPUs than the host: err %v\n%s", err, out)
	}
}

func TestNetworkModePolicy(t *testing.T) {
	s := startServer(t, withArgs("--network-allowed", "egress"))
	files := map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}
	code, body := s.submit(s.admin, submission{files: files, fields: [][2]string{{"network", "isolated"}}})
	if code != http.StatusForbidden || !strings.Contains(string(body), "network.allowed") {
		t.Errorf("disallowed mode: %d %s", code, body)
	}
	code, body = s.submit(s.admin, submission{files: files, fields: [][2]string{{"network", "wifi"}}})
	if code != http.StatusBadRequest {
		t.Errorf("unknown mode: %d %s", code, body)
	}
	code, body = s.submit(s.admin, submission{files: files, fields: [][2]string{{"allowed_domains", "not a domain!"}}})
	if code != http.StatusBadRequest || !strings.Contains(string(body), "allowed_domains") {
		t.Errorf("bad domain: %d %s", code, body)
	}
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: files}))
	if b.Network == nil || *b.Network != "egress" {
		t.Errorf("default network: %v", b.Network)
	}
	// The process runtime cannot enforce an allowlist: it refuses the
	// submission rather than run the build with more access than asked
	// for, and records nothing.
	var before api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds", nil, http.StatusOK, &before)
	code, body = s.submit(s.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY f /g\n", "f": "y"},
		fields: [][2]string{{"allowed_domains", "example.com"}}})
	if code != http.StatusBadRequest || !strings.Contains(string(body), "process runtime") || !strings.Contains(string(body), "vm runtime") {
		t.Errorf("allowlisted build on the process runtime: %d %s, want 400 pointing to the vm runtime", code, body)
	}
	// So does isolated, where network.allowed permits it.
	permissive := startServer(t)
	code, body = permissive.submit(permissive.admin, submission{files: files, fields: [][2]string{{"network", "isolated"}}})
	if code != http.StatusBadRequest || !strings.Contains(string(body), "process runtime") {
		t.Errorf("isolated build on the process runtime: %d %s, want 400", code, body)
	}
	var after api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds", nil, http.StatusOK, &after)
	if len(after.Builds) != len(before.Builds) {
		t.Errorf("refused submissions left build records: %d before, %d after", len(before.Builds), len(after.Builds))
	}
}
