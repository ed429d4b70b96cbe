package test

import (
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// TestWarmBuilderServesTheScopesNextBuild is builder reuse end to end on
// the process runtime: the scope's second build runs on the first one's
// buildkitd (the build says so, starts nothing, and is warm), another
// scope gets its own builder, `kiln builders` shows and stops them, and a
// kill -9 with warm builders leaves nothing the restart does not reap.
func TestWarmBuilderServesTheScopesNextBuild(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tokA := s.token("ci-a", "team-w", "build:write", "build:read", "image:read")
	tokB := s.token("ci-b", "team-v", "build:write", "build:read", "image:read")
	dockerfile := fmt.Sprintf("FROM %s\nRUN echo layer > /layer\nARG BUST\nRUN --mount=type=cache,target=/c echo \"$BUST\" >> /c/runs && cat /c/runs\n", base)
	build := func(tok, bust string) api.Build {
		return mustSucceed(t, s, tok, s.build(tok, submission{files: map[string]string{"Dockerfile": dockerfile},
			fields: [][2]string{{"build_args", fmt.Sprintf(`{"BUST":%q}`, bust)}}}))
	}

	first := build(tokA, "one")
	second := build(tokA, "two")
	if first.BuilderReused == nil || *first.BuilderReused {
		t.Errorf("first build of the scope: builder_reused = %v, want false", first.BuilderReused)
	}
	if second.BuilderReused == nil || !*second.BuilderReused {
		t.Fatalf("second build of the scope: builder_reused = %v, want true", second.BuilderReused)
	}
	log := s.logText(tokA, second.Id)
	if strings.Contains(log, "starting buildkitd") || !strings.Contains(log, "reusing the scope's warm builder") {
		t.Errorf("the reused build's log should say it reused the builder and started nothing:\n%s", log)
	}
	if !strings.Contains(log, "| one") || !strings.Contains(log, "| two") {
		t.Errorf("the cache mount did not carry over on the reused builder:\n%s", log)
	}
	if second.StepsCached < 1 {
		t.Errorf("reused build cached %d steps", second.StepsCached)
	}
	tm := *second.Timings
	for _, phase := range []string{"queued", "builder_start", "solve"} {
		if _, ok := tm[phase]; !ok {
			t.Errorf("timings lack %s: %v", phase, tm)
		}
	}
	if cold := (*first.Timings)["builder_start"]; tm["builder_start"] >= cold {
		t.Errorf("builder_start %.3fs on the reused builder, %.3fs on the fresh one", tm["builder_start"], cold)
	}

	other := build(tokB, "one")
	if *other.BuilderReused {
		t.Error("another scope's build reused team-w's builder")
	}
	var list api.BuilderList
	s.doJSON(s.admin, "GET", "/v1/builders", nil, http.StatusOK, &list)
	// Most recently used first; the admin's scope has one too (s.base).
	if len(list.Builders) != 3 || list.Builders[0].Scope != "team-v" || list.Builders[1].Scope != "team-w" ||
		list.Builders[1].Builds != 2 || list.Builders[1].State != api.Idle {
		t.Fatalf("builders: %+v", list.Builders)
	}
	s.doJSON(tokA, "GET", "/v1/builders", nil, http.StatusForbidden, nil)

	out, err := exec.Command(kilnBinary(t), "builders", "stop", "team-v", "--addr", s.url(""), "--token", s.admin).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "stopped the builder of scope team-v") {
		t.Fatalf("kiln builders stop: %v\n%s", err, out)
	}
	if again := build(tokB, "two"); *again.BuilderReused {
		t.Error("a stopped builder served the next build")
	}

	// Cancel on a reused builder stops the build promptly; the builder is
	// in doubt afterwards and the scope's next build gets a fresh one.
	held := s.build(tokA, submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo waiting && sleep 60\n", base)}})
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(s.logText(tokA, held.Id), "waiting") {
		if time.Now().After(deadline) {
			t.Fatalf("the step did not start:\n%s", s.logText(tokA, held.Id))
		}
		time.Sleep(100 * time.Millisecond)
	}
	start := time.Now()
	var canceled api.Build
	s.doJSON(tokA, "POST", "/v1/builds/"+held.Id+"/cancel", nil, http.StatusOK, &canceled)
	if canceled.Status != api.BuildStatusCanceled || time.Since(start) > 15*time.Second {
		t.Errorf("cancel on a reused builder: %s after %s", canceled.Status, time.Since(start))
	}
	if !strings.Contains(s.logText(tokA, held.Id), "reusing the scope's warm builder") {
		t.Error("the canceled build did not run on the reused builder")
	}
	if next := build(tokA, "after-cancel"); *next.BuilderReused {
		t.Error("the builder of a canceled build was reused")
	}

	// A crash with warm builders up: the restart reaps their mounts and
	// buildkitds, and the scope's next build starts a fresh builder.
	s.kill9()
	s.start(s.addr)
	after := build(tokA, "three")
	if *after.BuilderReused {
		t.Error("a builder survived the crash")
	}
	if log := s.logText(tokA, after.Id); !strings.Contains(log, "| two") || !strings.Contains(log, "| three") {
		t.Errorf("the cache did not survive the crash:\n%s", log)
	}
}

// TestIdleBuilderStopsAndLeavesItsVolumeClean: after builders.idle_timeout
// the builder is gone and its volume unmounted, detached and fsck-clean.
func TestIdleBuilderStopsAndLeavesItsVolumeClean(t *testing.T) {
	s := startServer(t, withArgs("--builders-idle-timeout", "1s"))
	mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo hi > /hi\n", s.base())}}))
	deadline := time.Now().Add(30 * time.Second)
	for {
		var list api.BuilderList
		s.doJSON(s.admin, "GET", "/v1/builders", nil, http.StatusOK, &list)
		if len(list.Builders) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("idle builder still up after 30s: %+v", list.Builders)
		}
		time.Sleep(200 * time.Millisecond)
	}
	assertNoLeftovers(t, s.data)
	imgs, _ := filepath.Glob(filepath.Join(s.data, "cache", "volumes", "*", "volume.ext4"))
	if len(imgs) != 1 {
		t.Fatalf("want one scope volume, found %v", imgs)
	}
	if out, err := exec.Command("e2fsck", "-fn", imgs[0]).CombinedOutput(); err != nil {
		t.Errorf("volume not clean after the idle stop: %v\n%s", err, out)
	}
}
