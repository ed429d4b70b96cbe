package cli

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// writeRandom writes size incompressible bytes: a context that cannot
// hide in socket buffers or shrink under compression.
func writeRandom(t *testing.T, path string, size int64, seed byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, rand.NewChaCha8([32]byte{seed}), size); err != nil {
		t.Fatal(err)
	}
}

func succeededServer(t *testing.T) *fakeServer {
	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusSucceeded, "")
	s.events = eventScript(3, &final)
	return s
}

func TestBuildUploadsFieldsSecretsAndContext(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{
		"Dockerfile":        "FROM scratch\nCOPY app /app\n",
		".dockerignore":     "*.md\nsecret.txt\nnode_modules\n",
		"app/main.go":       "package main\n",
		"README.md":         "excluded by .dockerignore\n",
		"secret.txt":        "excluded too\n",
		"node_modules/x.js": "excluded dir\n",
	})
	secretFile := filepath.Join(t.TempDir(), "npmrc")
	if err := os.WriteFile(secretFile, []byte("npm-secret-value"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KILN_TEST_ARG", "from-env")
	t.Setenv("KILN_TEST_TOKEN", "env-secret-value")

	res := s.kiln(context.Background(), "build",
		"-t", "app:1", "-t", "app:latest",
		"--build-arg", "VERSION=1.2", "--build-arg", "KILN_TEST_ARG", "--build-arg", "KILN_TEST_UNSET_ARG",
		"--target", "prod", "--no-cache", "--pull",
		"--platform", "linux/amd64,linux/arm64", "--platform", "linux/arm/v7",
		"--secret", "id=npm,src="+secretFile, "--secret", "id=gh,env=KILN_TEST_TOKEN",
		"--cache-scope", "team", "--global-cache-key", "base",
		"--cpus", "2", "--memory", "2048", "--disk", "20", "--timeout", "10m",
		"--progress", "plain", dir)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	up := s.upload(t, 0)

	// Streamed: the client cannot know the length of a body it generates.
	if up.contentLength != -1 {
		t.Errorf("request had Content-Length %d; a streamed body has none", up.contentLength)
	}
	// Fields first, then secrets, then the context, which ends the body.
	ctxAt := slices.Index(up.order, "context")
	if ctxAt != len(up.order)-1 {
		t.Errorf("part order %v: context must be the last part", up.order)
	}
	firstSecret := slices.Index(up.order, "secret")
	for i, name := range up.order {
		if name != "secret" && name != "context" && firstSecret >= 0 && i > firstSecret {
			t.Errorf("part order %v: field %q comes after a secret", up.order, name)
		}
	}

	want := map[string][]string{
		"tags":             {"app:1", "app:latest"},
		"dockerfile_path":  {"Dockerfile"},
		"build_args":       {`{"KILN_TEST_ARG":"from-env","VERSION":"1.2"}`},
		"target":           {"prod"},
		"platform":         {"linux/amd64,linux/arm64", "linux/arm/v7"},
		"no_cache":         {"true"},
		"pull":             {"true"},
		"cache_scope":      {"team"},
		"global_cache_key": {"base"},
		"cpus":             {"2"},
		"memory_mb":        {"2048"},
		"disk_gb":          {"20"},
		"timeout_seconds":  {"600"},
		"attach":           {"true"}, // not --detach: the build ends with its client
	}
	if !reflect.DeepEqual(up.fields, want) {
		t.Errorf("fields:\n got  %v\n want %v", up.fields, want)
	}
	wantSecrets := map[string]string{"npm": "npm-secret-value", "gh": "env-secret-value"}
	if !reflect.DeepEqual(up.secrets, wantSecrets) {
		t.Errorf("secrets: got %v, want %v", up.secrets, wantSecrets)
	}

	wantFiles := map[string]string{
		"Dockerfile":    "FROM scratch\nCOPY app /app\n",
		".dockerignore": "*.md\nsecret.txt\nnode_modules\n",
		"app":           "<dir>",
		"app/main.go":   "package main\n",
	}
	if !reflect.DeepEqual(up.files, wantFiles) {
		t.Errorf("context (%s) entries:\n got  %v\n want %v", up.contextType, up.files, wantFiles)
	}

	for _, v := range []string{"npm-secret-value", "env-secret-value"} {
		if strings.Contains(res.stdout+res.stderr, v) {
			t.Errorf("a secret value was printed:\n%s", res)
		}
	}
	for _, w := range []string{"digest: sha256:0123456789abcdef", "image:  builds/b1", "tag:    app:1"} {
		if !strings.Contains(res.stderr, w) {
			t.Errorf("stderr lacks %q:\n%s", w, res)
		}
	}
	if res.stdout != "" {
		t.Errorf("stdout carries only what was asked for, here nothing:\n%s", res)
	}
}

func TestBuildStreamsLargeContextWithoutBuffering(t *testing.T) {
	s := succeededServer(t)
	s.discardContext = true
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\nCOPY big /big\n"})
	// Random bytes do not compress, so the upload is as large as the file.
	const size = 128 << 20
	writeRandom(t, filepath.Join(dir, "big"), size, 1)

	// While the server holds off reading the context, the client must be
	// stuck inside the upload, not done packing into a buffer.
	var statsDuringHold runtime.MemStats
	s.uploadHook = func() {
		time.Sleep(200 * time.Millisecond)
		runtime.ReadMemStats(&statsDuringHold)
	}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	runtime.ReadMemStats(&after)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	if got := s.upload(t, 0).contextBytes; got < size {
		t.Fatalf("server received a %d-byte context part, want at least %d", got, size)
	}
	// Everything the client and this in-process server allocated over the
	// whole run stays far below the context's size: nothing held it.
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %s while sending a %s context", humanSize(int64(alloc)), humanSize(size))
	if alloc > size/2 {
		t.Errorf("allocated %s while sending a %s context: the body is being buffered", humanSize(int64(alloc)), humanSize(size))
	}
	if held := statsDuringHold.TotalAlloc - before.TotalAlloc; held > size/2 {
		t.Errorf("had allocated %s before the server read any of the context", humanSize(int64(held)))
	}
}

func TestBuildRejectedMidUploadShowsServerReason(t *testing.T) {
	s := succeededServer(t)
	s.rejectUpload = http.StatusRequestEntityTooLarge
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	writeRandom(t, filepath.Join(dir, "big"), 16<<20, 2)
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 1 {
		t.Fatalf("want exit 1:\n%s", res)
	}
	if !strings.Contains(res.stderr, "kiln: the build context is larger than context.max_bytes") {
		t.Errorf("stderr should carry the server's reason, not a broken pipe:\n%s", res)
	}
	if events, _, _ := s.counts(); events != 0 {
		t.Errorf("followed events of a build that was never created")
	}
}

func TestBuildDockerfilePlacement(t *testing.T) {
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{
		"Dockerfile":             "FROM scratch\n",
		"docker/Dockerfile.prod": "FROM scratch\nLABEL prod=1\n",
		".dockerignore":          "docker\n",
	})
	outside := filepath.Join(t.TempDir(), "Dockerfile.ci")
	if err := os.WriteFile(outside, []byte("FROM scratch\nLABEL ci=1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("inside the context is a path, sent even if ignored", func(t *testing.T) {
		s := succeededServer(t)
		res := s.kiln(context.Background(), "build", "-f", filepath.Join(dir, "docker/Dockerfile.prod"), "--progress", "plain", dir)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		up := s.upload(t, 0)
		if got := up.fields["dockerfile_path"]; !reflect.DeepEqual(got, []string{"docker/Dockerfile.prod"}) {
			t.Errorf("dockerfile_path = %v", got)
		}
		if _, ok := up.fields["dockerfile"]; ok {
			t.Errorf("an in-context Dockerfile was also sent inline")
		}
		if up.files["docker/Dockerfile.prod"] != "FROM scratch\nLABEL prod=1\n" {
			t.Errorf("the Dockerfile is missing from the context: %v", up.files)
		}
	})
	t.Run("outside the context is inline", func(t *testing.T) {
		s := succeededServer(t)
		res := s.kiln(context.Background(), "build", "-f", outside, "--progress", "plain", dir)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		up := s.upload(t, 0)
		if got := up.fields["dockerfile"]; !reflect.DeepEqual(got, []string{"FROM scratch\nLABEL ci=1\n"}) {
			t.Errorf("dockerfile = %v", got)
		}
		if _, ok := up.fields["dockerfile_path"]; ok {
			t.Errorf("dockerfile_path sent for an inline Dockerfile")
		}
	})
	t.Run("stdin is inline", func(t *testing.T) {
		s := succeededServer(t)
		res := runKiln(context.Background(), strings.NewReader("FROM scratch\nLABEL stdin=1\n"),
			"build", "-f", "-", "--progress", "plain", dir, "--addr", s.srv.URL, "--token", testToken)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		if got := s.upload(t, 0).fields["dockerfile"]; !reflect.DeepEqual(got, []string{"FROM scratch\nLABEL stdin=1\n"}) {
			t.Errorf("dockerfile = %v", got)
		}
	})
}

// jsonLines parses stdout of --progress json, failing on any line that is
// not exactly one JSON object.
// jsonLines reads the events of --progress json from stderr, where the
// client's own notes ("kiln: ...") are the only other lines.
func jsonLines(t *testing.T, stderr string) []api.Event {
	t.Helper()
	var evs []api.Event
	for i, line := range strings.Split(strings.TrimSuffix(stderr, "\n"), "\n") {
		if strings.HasPrefix(line, "kiln: ") {
			continue
		}
		var raw map[string]any
		if err := json.Unmarshal([]byte(line), &raw); err != nil {
			t.Fatalf("stderr line %d is not a JSON object: %q: %v", i+1, line, err)
		}
		var ev api.Event
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("stderr line %d is not an Event: %v", i+1, err)
		}
		evs = append(evs, ev)
	}
	return evs
}

func eventIDs(evs []api.Event) []int64 {
	ids := make([]int64, len(evs))
	for i, e := range evs {
		ids[i] = e.Id
	}
	return ids
}

func TestProgressJSONIsOneEventPerLine(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(context.Background(), "build", "--progress", "json", dir)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if res.stdout != "" {
		t.Errorf("progress belongs on stderr, stdout should be empty:\n%s", res)
	}
	got := jsonLines(t, res.stderr)
	if !reflect.DeepEqual(eventIDs(got), eventIDs(s.events)) {
		t.Fatalf("event ids on stderr %v, want %v", eventIDs(got), eventIDs(s.events))
	}
	for i := range got {
		want, _ := json.Marshal(s.events[i])
		have, _ := json.Marshal(got[i])
		if string(want) != string(have) {
			t.Errorf("event %d changed on the way:\n got  %s\n want %s", i, have, want)
		}
	}
	if strings.Contains(res.stderr, "digest: sha256:") {
		t.Errorf("json mode leaves the outcome to the end event; no human summary:\n%s", res)
	}
}

func TestEventStreamResumesAfterDrops(t *testing.T) {
	// Each connection is cut differently: a clean close, a cut in the
	// middle of an event, a hard TCP reset, another clean close.
	drops := []eventsPlan{
		{send: 5},
		{send: 4, partial: true},
		{send: 6, partial: true, abort: true},
		{send: 3, abort: true},
		{send: -1},
	}
	plan := func(call int) eventsPlan {
		if call < len(drops) {
			return drops[call]
		}
		return eventsPlan{send: -1}
	}
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})

	t.Run("json", func(t *testing.T) {
		s := succeededServer(t)
		s.events = eventScript(20, p(finishedBuild(api.BuildStatusSucceeded, "")))
		s.plan = plan
		res := s.kiln(context.Background(), "build", "--progress", "json", dir)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		if got, want := eventIDs(jsonLines(t, res.stderr)), eventIDs(s.events); !reflect.DeepEqual(got, want) {
			t.Fatalf("events shown %v, want each of %v exactly once, in order", got, want)
		}
		wantIDs := []string{"", "5", "9", "15", "18"}
		if !reflect.DeepEqual(s.lastEventIDs, wantIDs) {
			t.Errorf("Last-Event-ID of the connections = %q, want %q", s.lastEventIDs, wantIDs)
		}
	})
	t.Run("plain", func(t *testing.T) {
		s := succeededServer(t)
		s.events = eventScript(20, p(finishedBuild(api.BuildStatusSucceeded, "")))
		s.plan = plan
		res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		var logs []string
		for _, l := range strings.Split(res.stderr, "\n") {
			if i := strings.Index(l, "compiling unit "); i >= 0 {
				logs = append(logs, l[i:])
			}
		}
		var want []string
		for i := 1; i <= 20; i++ {
			want = append(want, "compiling unit "+strconv.Itoa(i))
		}
		if !reflect.DeepEqual(logs, want) {
			t.Errorf("log lines shown:\n%q\nwant each once in order:\n%q\n%s", logs, want, res)
		}
		for _, w := range []string{"#1 [1/3] FROM docker.io/library/alpine:3\n#1 CACHED\n", "#2 [2/3] RUN make\n", "#2 DONE ", "phase: pushing", "kiln: pushed builds/b1"} {
			if strings.Count(res.stderr, w) != 1 {
				t.Errorf("stderr should contain %q once:\n%s", w, res)
			}
		}
		if !strings.Contains(res.stderr, "reconnecting") {
			t.Errorf("stderr should say the stream is being resumed:\n%s", res)
		}
	})
}

func TestEventsUnavailableFallsBackToPolling(t *testing.T) {
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})

	t.Run("build fails while the stream is down", func(t *testing.T) {
		s := newFakeServer(t)
		s.plan = func(int) eventsPlan { return eventsPlan{status: 502} }
		s.getBuild = func(call int) api.Build {
			if call < 3 {
				b := testBuild(api.BuildStatusRunning)
				b.Phase = "solving"
				return b
			}
			return finishedBuild(api.BuildStatusFailed, `process "/bin/sh -c make" did not complete successfully: exit code: 2`)
		}
		res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
		if res.code != 1 {
			t.Fatalf("want exit 1 for a failed build:\n%s", res)
		}
		if !strings.Contains(res.stderr, "exit code: 2") {
			t.Errorf("stderr should carry the build's error:\n%s", res)
		}
		if !strings.Contains(res.stderr, "event stream unavailable") || !strings.Contains(res.stderr, "events backend unavailable") {
			t.Errorf("stderr should say why it polls:\n%s", res)
		}
		if !strings.Contains(res.stderr, "status: running (phase solving)") {
			t.Errorf("polled state not shown:\n%s", res)
		}
		events, gets, _ := s.counts()
		if gets != 4 {
			t.Errorf("GET /v1/builds/b1 called %d times, want 4 (3 running, then failed)", gets)
		}
		if events < 3+gets-1 {
			t.Errorf("events endpoint tried %d times; it should be retried while polling", events)
		}
	})

	t.Run("stream comes back", func(t *testing.T) {
		s := succeededServer(t)
		s.plan = func(call int) eventsPlan {
			if call < 5 {
				return eventsPlan{status: 502}
			}
			return eventsPlan{send: -1}
		}
		s.getBuild = func(int) api.Build { return testBuild(api.BuildStatusRunning) }
		res := s.kiln(context.Background(), "build", "--progress", "json", dir)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		if got, want := eventIDs(jsonLines(t, res.stderr)), eventIDs(s.events); !reflect.DeepEqual(got, want) {
			t.Fatalf("events %v, want %v", got, want)
		}
		if _, gets, _ := s.counts(); gets == 0 {
			t.Errorf("never polled while the stream was down")
		}
		if !strings.Contains(res.stderr, "event stream is back") {
			t.Errorf("stderr should say the stream resumed:\n%s", res)
		}
	})
}

func TestInterruptCancelsBuild(t *testing.T) {
	s := newFakeServer(t)
	s.events = eventScript(2, nil) // still running
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})

	go func() {
		select {
		case <-s.streaming:
			// The client is inside the follow loop, with its handler
			// installed: a real Ctrl-C.
			syscall.Kill(os.Getpid(), syscall.SIGINT)
		case <-time.After(10 * time.Second):
		}
	}()
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 130 {
		t.Fatalf("want exit 130 after Ctrl-C:\n%s", res)
	}
	if _, _, cancels := s.counts(); cancels != 1 {
		t.Errorf("cancel endpoint called %d times, want 1", cancels)
	}
	if !strings.Contains(res.stderr, "build b1 canceled") {
		t.Errorf("stderr should say the build was canceled:\n%s", res)
	}
}

func TestCanceledContextCancelsBuild(t *testing.T) {
	s := newFakeServer(t)
	s.events = eventScript(2, nil)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-s.streaming
		cancel()
	}()
	res := s.kiln(ctx, "build", "--progress", "tty", dir)
	if res.code != 130 {
		t.Fatalf("want exit 130:\n%s", res)
	}
	if _, _, cancels := s.counts(); cancels != 1 {
		t.Errorf("cancel endpoint called %d times, want 1", cancels)
	}
}

func TestInterruptDuringUploadAbortsIt(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	// Larger than socket buffers, so the upload is still going on when
	// the interrupt comes.
	writeRandom(t, filepath.Join(dir, "big"), 16<<20, 3)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.uploadHook = func() {
		cancel()
		time.Sleep(100 * time.Millisecond)
	}
	res := s.kiln(ctx, "build", "--progress", "plain", dir)
	if res.code != 130 {
		t.Fatalf("want exit 130:\n%s", res)
	}
	if !strings.Contains(res.stderr, "upload interrupted") {
		t.Errorf("stderr should say the upload was interrupted:\n%s", res)
	}
	if events, _, cancels := s.counts(); events != 0 || cancels != 0 {
		t.Errorf("after an aborted upload the client made %d events and %d cancel calls", events, cancels)
	}
	if s.uploadErr(t, 0) == nil {
		t.Errorf("the server read a complete upload although it was aborted")
	}
}

func TestFailedBuildExitsOne(t *testing.T) {
	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusFailed, `process "/bin/sh -c make" did not complete successfully: exit code: 2`)
	s.events = eventScript(2, &final)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 1 {
		t.Fatalf("want exit 1:\n%s", res)
	}
	if !strings.Contains(res.stderr, "#2 ERROR: exit code: 2") {
		t.Errorf("stderr should show the failed step:\n%s", res)
	}
	if !strings.Contains(res.stderr, "build b1 failed: process \"/bin/sh -c make\" did not complete successfully: exit code: 2") {
		t.Errorf("stderr should carry the build's error:\n%s", res)
	}
	if strings.Contains(res.stderr, "digest:") || res.stdout != "" {
		t.Errorf("a failed build has no digest to print:\n%s", res)
	}
}

func TestTTYProgress(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(context.Background(), "build", "--progress", "tty", dir)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	// The last frame is what stays on the screen.
	if res.stdout != "" {
		t.Errorf("the tty view belongs on stderr:\n%q", res.stdout)
	}
	frames := strings.Split(res.stderr, "\x1b[J")
	if len(frames) < 2 {
		t.Fatalf("no ANSI repaint in tty output:\n%q", res.stderr)
	}
	last := frames[len(frames)-2]
	for _, w := range []string{"[+] Building ", "(2/2) SUCCEEDED", "=> CACHED [1/3] FROM docker.io/library/alpine:3", "=> [2/3] RUN make", "=> kiln: pushed builds/b1"} {
		if !strings.Contains(last, w) {
			t.Errorf("final frame lacks %q:\n%s", w, last)
		}
	}
	if strings.Contains(last, "compiling unit") {
		t.Errorf("the final frame should not keep logs of a finished step:\n%s", last)
	}
	if !strings.Contains(res.stderr, "digest: sha256:") {
		t.Errorf("no digest after the view:\n%s", res)
	}
}

func TestBuildUsageErrors(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	for name, args := range map[string][]string{
		"bad build-arg name":   {"build", "--build-arg", "1BAD=x", dir},
		"bad progress":         {"build", "--progress", "fancy", dir},
		"no context":           {"build"},
		"context not a dir":    {"build", filepath.Join(dir, "Dockerfile")},
		"missing Dockerfile":   {"build", t.TempDir()},
		"unknown flag":         {"build", "--frobnicate", dir},
		"bad secret":           {"build", "--secret", "src=/nonexistent/file", dir},
		"secret env unset":     {"build", "--secret", "id=x,env=KILN_TEST_SURELY_UNSET", dir},
		"global cache no key":  {"build", "--global-cache", dir},
		"bad timeout":          {"build", "--timeout", "soon", dir},
		"bad status filter":    {"builds", "ls", "--status", "done"},
		"token without scope":  {"token", "create", "--subject", "ci"},
		"unknown subcommand":   {"builds", "frob"},
		"unknown scope":        {"token", "create", "--subject", "ci", "--scope", "build:everything"},
		"extra args to ls":     {"images", "ls", "x", "y"},
		"cancel without an id": {"builds", "cancel"},
	} {
		t.Run(name, func(t *testing.T) {
			res := s.kiln(context.Background(), args...)
			if res.code != 2 {
				t.Errorf("want exit 2:\n%s", res)
			}
			if !strings.HasPrefix(res.stderr, "kiln: ") {
				t.Errorf("want an error on stderr:\n%s", res)
			}
		})
	}
	if reqs := s.seenRequests(); len(reqs) != 0 {
		t.Errorf("usage errors reached the server: %v", reqs)
	}
}

func TestParseBuildArgs(t *testing.T) {
	env := map[string]string{"FROM_ENV": "v", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	got, err := parseBuildArgs([]string{"A=1", "B=x=y", "C=", "FROM_ENV", "EMPTY", "NOT_SET"}, lookup)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"A": "1", "B": "x=y", "C": "", "FROM_ENV": "v", "EMPTY": ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	for _, bad := range []string{"=1", "A-B=1", "9A=1", "A B=1", ""} {
		if _, err := parseBuildArgs([]string{bad}, lookup); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// Names and caches on other registries travel as fields, with the
// credentials the user's docker config has for those registries (and for
// no other, kiln's own included) in one memory-only registry_auth part.
func TestBuildSendsRegistryFieldsAndDockerCredentials(t *testing.T) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	kilnHost := strings.TrimPrefix(s.srv.URL, "http://")
	cfg := t.TempDir()
	writeTree(t, cfg, map[string]string{"config.json": `{"auths":{
		"https://ghcr.io/v1/": {"auth":"` + base64.StdEncoding.EncodeToString([]byte("u:ghcr-pw")) + `"},
		"cache.example.com:5000": {"username":"c","password":"cache-pw"},
		"unrelated.io": {"username":"x","password":"never-sent"},
		"` + kilnHost + `": {"username":"k","password":"kiln-pw"}}}`})
	t.Setenv("DOCKER_CONFIG", cfg)

	res := s.kiln(context.Background(), "build", "--progress", "plain",
		"-t", "ghcr.io/org/app:1", "-t", kilnHost+"/app:1", "-o", "type=image,name=other.io/x:2,push=true",
		"--cache-from", "type=registry,ref=cache.example.com:5000/c:1", "--cache-to", "cache.example.com:5000/c:1",
		"--build-context", "base=docker-image://img.io/base:1", "--build-context", "src=https://example.com/src.git#main",
		dir)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	up := s.upload(t, 0)
	for field, want := range map[string][]string{
		"push":           {"true"},
		"tags":           {"ghcr.io/org/app:1", kilnHost + "/app:1", "other.io/x:2"},
		"cache_from":     {"type=registry,ref=cache.example.com:5000/c:1"},
		"cache_to":       {"cache.example.com:5000/c:1"},
		"build_contexts": {"base=docker-image://img.io/base:1", "src=https://example.com/src.git#main"},
	} {
		if !reflect.DeepEqual(up.fields[field], want) {
			t.Errorf("field %s = %v, want %v", field, up.fields[field], want)
		}
	}
	var auth map[string]map[string]string
	if raw := up.fields["registry_auth"]; len(raw) != 1 || json.Unmarshal([]byte(raw[0]), &auth) != nil {
		t.Fatalf("registry_auth parts: %v", up.fields["registry_auth"])
	}
	if auth["ghcr.io"]["password"] != "ghcr-pw" || auth["cache.example.com:5000"]["password"] != "cache-pw" || len(auth) != 2 {
		t.Errorf("registry_auth = %v, want ghcr.io and cache.example.com:5000 only", auth)
	}

	// Without --push, type=image,push=true alone asks for the push.
	s2 := succeededServer(t)
	if res := s2.kiln(context.Background(), "build", "--progress", "plain", "-o", "type=registry,name=ghcr.io/org/app:2", dir); res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	if got := s2.upload(t, 0).fields["push"]; !reflect.DeepEqual(got, []string{"true"}) {
		t.Errorf("-o type=registry: push field %v, want true", got)
	}
}
