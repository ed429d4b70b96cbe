package test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

var (
	binOnce sync.Once
	binErr  error
	kilnBin string
)

// kilnBinary builds bin/kiln from this tree once per test run, so the
// tests never run a stale binary.
func kilnBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		root, err := testkit.RepoRoot()
		if err != nil {
			binErr = err
			return
		}
		kilnBin = filepath.Join(root, "bin", "kiln")
		cmd := exec.Command("go", "build", "-o", kilnBin, "./cmd/kiln")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build ./cmd/kiln: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return kilnBin
}

// server is one running `kiln serve`.
type server struct {
	t       testing.TB
	data    string
	addr    string // host:port
	admin   string // admin token
	cmd     *exec.Cmd
	logMu   sync.Mutex
	log     bytes.Buffer
	exited  chan struct{}
	args    []string
	baseRef string
}

type serverOpt func(*[]string)

func withArgs(a ...string) serverOpt { return func(args *[]string) { *args = append(*args, a...) } }

// withPostgresAndS3 puts kiln's records and queue in a fresh PostgreSQL
// database and its registry in a fresh S3 bucket (versitygw), both
// started for t and stopped when it ends.
func withPostgresAndS3(t testing.TB) serverOpt {
	t.Helper()
	s3 := testkit.StartS3(t)
	return withArgs("--database", testkit.Postgres(t),
		"--registry-storage", "s3", "--registry-s3-bucket", s3.Bucket,
		"--registry-s3-regionendpoint", s3.Endpoint, "--registry-s3-forcepathstyle", "true",
		"--registry-s3-accesskey", s3.AccessKey, "--registry-s3-secretkey", s3.SecretKey)
}

// startServer runs kiln serve on a fresh data dir and a free port.
func startServer(t testing.TB, opts ...serverOpt) *server {
	t.Helper()
	s := &server{t: t, data: t.TempDir()}
	for _, o := range opts {
		o(&s.args)
	}
	s.start("127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

var servingRE = regexp.MustCompile(`msg="kiln is serving" api=http://([0-9.:]+)`)

func (s *server) start(listen string) {
	t := s.t
	t.Helper()
	args := append([]string{"serve", "--data", s.data, "--listen", listen, "--runtime", "process"}, s.args...)
	cmd := exec.Command(kilnBinary(t), args...)
	cmd.Env = append(os.Environ(), "KILN_BUILDKITD="+testkit.Buildkitd(t))
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start kiln serve: %v", err)
	}
	s.cmd = cmd
	s.exited = make(chan struct{})
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.logMu.Lock()
			s.log.WriteString(line + "\n")
			s.logMu.Unlock()
			if m := servingRE.FindStringSubmatch(line); m != nil {
				select {
				case addrc <- m[1]:
				default:
				}
			}
		}
	}()
	go func() { cmd.Wait(); pw.Close(); close(s.exited) }()
	select {
	case s.addr = <-addrc:
	case <-s.exited:
		t.Fatalf("kiln serve exited at start:\n%s", s.logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("kiln serve did not start in 60s:\n%s", s.logs())
	}
	tok, err := os.ReadFile(filepath.Join(s.data, "admin.token"))
	if err != nil {
		t.Fatalf("admin token: %v", err)
	}
	s.admin = strings.TrimSpace(string(tok))
}

func (s *server) logs() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// stop shuts kiln down gracefully (SIGINT) and reports leftovers.
func (s *server) stop() {
	if s.cmd == nil {
		return
	}
	select {
	case <-s.exited:
	default:
		s.cmd.Process.Signal(os.Interrupt)
		select {
		case <-s.exited:
		case <-time.After(45 * time.Second):
			s.cmd.Process.Kill()
			<-s.exited
			s.t.Errorf("kiln serve did not stop within 45s of SIGINT")
		}
	}
	s.cmd = nil
	if s.t.Failed() {
		s.t.Logf("kiln serve log:\n%s", s.logs())
	}
	assertNoLeftovers(s.t, s.data)
}

// kill9 kills the server and everything in its process group the way a
// crash would: no cleanup runs.
func (s *server) kill9() {
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.exited
	s.cmd = nil
}

// assertNoLeftovers checks that nothing kiln started outlives it: no
// mounts under the data dir, no buildkitd using it.
func assertNoLeftovers(t testing.TB, data string) {
	t.Helper()
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, data) {
			t.Errorf("mount left behind: %s", line)
		}
	}
	out, _ := exec.Command("pgrep", "-af", "buildkitd.*"+regexp.QuoteMeta(data)).Output()
	if len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("buildkitd left running: %s", out)
	}
}

func (s *server) url(p string) string { return "http://" + s.addr + p }

// token mints a token through the API with the admin token.
func (s *server) token(subject, cacheScope string, scopes ...string) string {
	s.t.Helper()
	body := map[string]any{"subject": subject, "scopes": scopes, "ttl": "1h"}
	if cacheScope != "" {
		body["cache_scope"] = cacheScope
	}
	var tok api.Token
	s.doJSON(s.admin, "POST", "/v1/tokens", body, http.StatusCreated, &tok)
	return tok.Token
}

func (s *server) do(token, method, path string, body io.Reader, contentType string) *http.Response {
	s.t.Helper()
	req, err := http.NewRequest(method, s.url(path), body)
	if err != nil {
		s.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

// doJSON sends v as JSON (if non-nil), checks the status and decodes the
// answer into out (if non-nil).
func (s *server) doJSON(token, method, path string, v any, want int, out any) {
	s.t.Helper()
	var body io.Reader
	ct := ""
	if v != nil {
		b, _ := json.Marshal(v)
		body, ct = bytes.NewReader(b), "application/json"
	}
	resp := s.do(token, method, path, body, ct)
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		s.t.Fatalf("%s %s: status %d, want %d: %s", method, path, resp.StatusCode, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			s.t.Fatalf("%s %s: decode %s: %v", method, path, data, err)
		}
	}
}

// submission is one POST /v1/builds.
type submission struct {
	files   map[string]string // context files (name → content)
	binary  map[string]string // context files copied from host paths
	context []byte            // raw context bytes instead of files
	fields  [][2]string
	secrets map[string]string
}

func (sub submission) body(t testing.TB) (io.Reader, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, f := range sub.fields {
		mw.WriteField(f[0], f[1])
	}
	for id, v := range sub.secrets {
		w, _ := mw.CreateFormFile("secret", id)
		io.WriteString(w, v)
	}
	ctxBytes := sub.context
	if ctxBytes == nil {
		ctxBytes = tarOf(t, sub.files, sub.binary)
	}
	w, _ := mw.CreateFormFile("context", "context.tar")
	w.Write(ctxBytes)
	mw.Close()
	return &buf, mw.FormDataContentType()
}

func tarOf(t testing.TB, files, binary map[string]string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var names []string
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg})
		io.WriteString(tw, files[n])
	}
	for n, src := range binary {
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg})
		tw.Write(data)
	}
	tw.Close()
	return buf.Bytes()
}

// submit posts a build and returns the response status and body.
func (s *server) submit(token string, sub submission) (int, []byte) {
	s.t.Helper()
	body, ct := sub.body(s.t)
	resp := s.do(token, "POST", "/v1/builds", body, ct)
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// build submits and expects 202.
func (s *server) build(token string, sub submission) api.Build {
	s.t.Helper()
	code, data := s.submit(token, sub)
	if code != http.StatusAccepted {
		s.t.Fatalf("submit build: status %d: %s", code, data)
	}
	var b api.Build
	json.Unmarshal(data, &b)
	return b
}

func (s *server) get(token, id string) api.Build {
	s.t.Helper()
	var b api.Build
	s.doJSON(token, "GET", "/v1/builds/"+id, nil, http.StatusOK, &b)
	return b
}

// wait polls until the build is terminal.
func (s *server) wait(token, id string, timeout time.Duration) api.Build {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b := s.get(token, id)
		switch b.Status {
		case api.BuildStatusSucceeded, api.BuildStatusFailed, api.BuildStatusCanceled:
			return b
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("build %s still %s (%s) after %s", id, b.Status, b.Phase, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitStatus polls until the build reaches status.
func (s *server) waitStatus(token, id string, status api.BuildStatus, timeout time.Duration) api.Build {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b := s.get(token, id)
		if b.Status == status {
			return b
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("build %s is %s (%s), not %s, after %s", id, b.Status, b.Phase, status, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *server) logText(token, id string) string {
	s.t.Helper()
	resp := s.do(token, "GET", "/v1/builds/"+id+"/logs", nil, "")
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return string(data)
}

func mustSucceed(t testing.TB, s *server, token string, b api.Build) api.Build {
	t.Helper()
	b = s.wait(token, b.Id, 5*time.Minute)
	if b.Status != api.BuildStatusSucceeded {
		msg := ""
		if b.Error != nil {
			msg = *b.Error
		}
		t.Fatalf("build %s %s: %s\nlog:\n%s", b.Id, b.Status, msg, s.logText(token, b.Id))
	}
	return b
}

// base builds the busybox base image into this server's registry once
// and returns its FROM reference.
func (s *server) base() string {
	s.t.Helper()
	if s.baseRef != "" {
		return s.baseRef
	}
	b := s.build(s.admin, submission{
		files:  map[string]string{"Dockerfile": testkit.BusyboxDockerfile},
		binary: map[string]string{"busybox": testkit.BusyboxSource},
		fields: [][2]string{{"tags", "base/busybox:latest"}},
	})
	mustSucceed(s.t, s, s.admin, b)
	s.baseRef = s.addr + "/base/busybox:latest"
	return s.baseRef
}

// contextEntries lists what is left in the server's context store.
func (s *server) contextEntries() []string {
	entries, _ := os.ReadDir(filepath.Join(s.data, "contexts"))
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

var realmRE = regexp.MustCompile(`realm="([^"]+)",service="([^"]+)"`)

// registryGet GETs /v2/<repo>/<path> from kiln's registry as any OCI
// client does: it meets the challenge, trades token for a pull token of
// repo, and asks again with it (and accept, if not "").
func (s *server) registryGet(token, repo, path, accept string) *http.Response {
	s.t.Helper()
	u := s.url("/v2/" + repo + "/" + path)
	resp, err := http.Get(u)
	if err != nil {
		s.t.Fatal(err)
	}
	resp.Body.Close()
	m := realmRE.FindStringSubmatch(resp.Header.Get("WWW-Authenticate"))
	if m == nil {
		s.t.Fatalf("registry challenge %q", resp.Header.Get("WWW-Authenticate"))
	}
	req, _ := http.NewRequest("GET", m[1]+"?service="+m[2]+"&scope=repository:"+repo+":pull", nil)
	req.SetBasicAuth("kiln", token)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	var tr struct{ Token string }
	json.NewDecoder(resp.Body).Decode(&tr)
	resp.Body.Close()
	req, _ = http.NewRequest("GET", u, nil)
	req.Header.Set("Authorization", "Bearer "+tr.Token)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	return resp
}
