package test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln build keeps docker buildx build's output contract: progress on
// stderr in every mode, stdout only what was asked for (-q: the digest),
// --iidfile and --metadata-file as buildx writes them, --progress
// quiet|rawjson, --detach; and a client that goes away (SIGTERM, a broken
// pipe) cancels its build on the server.
func TestBuildxOutputContract(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	dir := t.TempDir()
	// N changes per build, so no build is answered by an identical one
	// (a deduplicated build has no steps to show).
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nARG N\nRUN echo step-$N > /n && cat /n\n", base)})

	t.Run("quiet prints the digest alone; iidfile and metadata-file", func(t *testing.T) {
		files := t.TempDir()
		iid, meta := files+"/iid", files+"/meta.json"
		stdout, stderr, code := s.kilnSplit(tok, nil, "build", "-q", "-t", "app:1", "-t", "app:x", "--build-arg", "N=1",
			"--iidfile", iid, "--metadata-file", meta, dir)
		if code != 0 {
			t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
		}
		if !regexp.MustCompile(`^sha256:[0-9a-f]{64}\n$`).MatchString(stdout) || stderr != "" {
			t.Fatalf("want the digest alone on stdout, nothing on stderr:\nstdout %q\nstderr %q", stdout, stderr)
		}
		digest := strings.TrimSpace(stdout)
		if b, _ := os.ReadFile(iid); string(b) != digest {
			t.Errorf("iidfile %q, want %q without a newline", b, digest)
		}
		var md map[string]any
		b, err := os.ReadFile(meta)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &md); err != nil {
			t.Fatalf("metadata file is not JSON: %v\n%s", err, b)
		}
		id, _ := md["kiln.build.id"].(string)
		if got := s.get(tok, id); got.ImageDigest == nil || *got.ImageDigest != digest {
			t.Errorf("build %q has image digest %v, -q printed %s", id, got.ImageDigest, digest)
		}
		if md["containerimage.digest"] != digest {
			t.Errorf("containerimage.digest %v, want %s", md["containerimage.digest"], digest)
		}
		// The descriptor is the registry's own manifest.
		mediaType, body := s.manifest(tok, "dev/app", digest)
		desc, _ := md["containerimage.descriptor"].(map[string]any)
		want := map[string]any{"mediaType": mediaType, "digest": digest, "size": float64(len(body))}
		if fmt.Sprint(desc) != fmt.Sprint(want) {
			t.Errorf("containerimage.descriptor %v, want %v", desc, want)
		}
		var m struct {
			Config struct{ Digest string } `json:"config"`
		}
		json.Unmarshal(body, &m)
		if m.Config.Digest == "" || md["containerimage.config.digest"] != m.Config.Digest {
			t.Errorf("containerimage.config.digest %v, want the manifest's config %q", md["containerimage.config.digest"], m.Config.Digest)
		}
		var names []string
		for _, n := range []string{"dev/app:1", "dev/app:x"} {
			var im api.Image
			s.doJSON(tok, "GET", "/v1/images/"+n, nil, http.StatusOK, &im)
			names = append(names, *im.Reference)
		}
		if want := strings.Join(names, ","); md["image.name"] != want || !strings.HasPrefix(want, s.addr+"/dev/app:1") {
			t.Errorf("image.name %v, want %s", md["image.name"], want)
		}
		// 2>/dev/null: stdout alone is the digest, for ID=$(kiln build -q .).
		sh := exec.Command("sh", "-c", `ID=$("$KILN" build -q --build-arg N=2 "$DIR" 2>/dev/null) && printf '%s' "$ID"`)
		sh.Env = append(os.Environ(), "KILN="+kilnBinary(t), "DIR="+dir, "KILN_ADDR=http://"+s.addr, "KILN_TOKEN="+tok)
		out, err := sh.Output()
		if err != nil || !regexp.MustCompile(`^sha256:[0-9a-f]{64}$`).Match(out) {
			t.Errorf("ID=$(kiln build -q .): %q, %v", out, err)
		}
	})

	t.Run("plain and tty progress go to stderr", func(t *testing.T) {
		for i, mode := range []string{"plain", "tty"} {
			stdout, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", mode, "--build-arg", fmt.Sprintf("N=p%d", i), dir)
			if code != 0 || stdout != "" {
				t.Errorf("%s: exit %d, stdout must be empty:\nstdout:\n%s\nstderr:\n%s", mode, code, stdout, stderr)
			}
			if !strings.Contains(stderr, fmt.Sprintf("step-p%d", i)) && mode == "plain" {
				t.Errorf("%s: stderr lacks the RUN output:\n%s", mode, stderr)
			}
			if !strings.Contains(stderr, "digest: sha256:") {
				t.Errorf("%s: stderr lacks the outcome:\n%s", mode, stderr)
			}
		}
	})

	t.Run("rawjson is BuildKit's SolveStatus stream; quiet prints nothing", func(t *testing.T) {
		stdout, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "rawjson", "--build-arg", "N=raw", dir)
		if code != 0 || stdout != "" {
			t.Fatalf("exit %d, stdout %q\nstderr:\n%s", code, stdout, stderr)
		}
		type vertex struct {
			Digest, Name       string
			Started, Completed *time.Time
			Cached             bool
		}
		type solveStatus struct {
			Vertexes []vertex `json:"vertexes"`
			Logs     []struct {
				Vertex string `json:"vertex"`
				Data   []byte `json:"data"`
			} `json:"logs"`
		}
		var named, completed int
		var logs bytes.Buffer
		for i, line := range strings.Split(strings.TrimSuffix(stderr, "\n"), "\n") {
			var ss solveStatus
			if err := json.Unmarshal([]byte(line), &ss); err != nil {
				t.Fatalf("stderr line %d is not JSON: %q", i+1, line)
			}
			for _, v := range ss.Vertexes {
				if strings.HasPrefix(v.Digest, "sha256:") && v.Name != "" {
					named++
				}
				if v.Completed != nil {
					completed++
				}
			}
			for _, l := range ss.Logs {
				logs.Write(l.Data)
			}
		}
		if named == 0 || completed == 0 || !strings.Contains(logs.String(), "step-raw") {
			t.Errorf("%d named vertexes, %d completed, logs %q:\n%s", named, completed, logs.String(), stderr)
		}

		stdout, stderr, code = s.kilnSplit(tok, nil, "build", "--progress", "quiet", "--build-arg", "N=quiet", dir)
		if code != 0 || stdout != "" || stderr != "" {
			t.Errorf("--progress quiet: exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
	})

	t.Run("detach prints the build id and returns", func(t *testing.T) {
		slow := t.TempDir()
		testkit.WriteFiles(t, slow, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 3 && echo detached\n", base)})
		start := time.Now()
		stdout, stderr, code := s.kilnSplit(tok, nil, "build", "--detach", slow)
		id := strings.TrimSpace(stdout)
		if code != 0 || !regexp.MustCompile(`^[A-Za-z0-9-]+\n$`).MatchString(stdout) {
			t.Fatalf("exit %d, stdout %q, stderr:\n%s", code, stdout, stderr)
		}
		b := s.get(tok, id)
		if b.Status != api.BuildStatusQueued && b.Status != api.BuildStatusRunning {
			t.Errorf("after %s the detached build is %s, want it still queued or running", time.Since(start), b.Status)
		}
		if b = s.wait(tok, id, 2*time.Minute); b.Status != api.BuildStatusSucceeded {
			t.Errorf("detached build %s: %s", id, b.Status)
		}
	})

	// A build that runs until canceled, printing now and then so that a
	// broken pipe is written to.
	long := t.TempDir()
	testkit.WriteFiles(t, long, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nARG N\nRUN for i in $(seq 1 120); do echo tick-$N-$i; sleep 1; done\n", base)})

	t.Run("SIGTERM cancels the build", func(t *testing.T) {
		cmd, stderr := s.kilnStart(tok, "build", "--progress", "plain", "--build-arg", "N=term", long)
		id := stderr.waitFor(t, `tick-term-1\b`)
		cmd.Process.Signal(syscall.SIGTERM)
		code := waitExit(t, cmd)
		if code != 130 {
			t.Errorf("exit %d after SIGTERM, want 130\n%s", code, stderr.String())
		}
		s.waitStatus(tok, id, api.BuildStatusCanceled, 15*time.Second)
	})

	t.Run("a broken pipe cancels the build", func(t *testing.T) {
		cmd, stderr := s.kilnStart(tok, "build", "--progress", "plain", "--build-arg", "N=pipe", long)
		id := stderr.waitFor(t, `tick-pipe-1\b`)
		stderr.r.Close() // the reader goes away, as `| head -1` does
		code := waitExit(t, cmd)
		if code != 1 {
			t.Errorf("exit %d after its stderr broke, want 1", code)
		}
		s.waitStatus(tok, id, api.BuildStatusCanceled, 15*time.Second)
	})
}

// kilnSplit runs the CLI with stdout and stderr apart.
func (s *server) kilnSplit(token string, stdin io.Reader, args ...string) (stdout, stderr string, code int) {
	s.t.Helper()
	cmd := exec.Command(kilnBinary(s.t), args...)
	cmd.Env = append(os.Environ(), "KILN_ADDR=http://"+s.addr, "KILN_TOKEN="+token)
	cmd.Stdin = stdin
	return runSplit(s.t, cmd)
}

// runSplit runs cmd with its stdout and stderr apart and returns its exit
// code; a command that cannot start fails the test.
func runSplit(t testing.TB, cmd *exec.Cmd) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

// pipeReader is the reading end of the CLI's stderr, read line by line.
type pipeReader struct {
	r     *os.File
	lines chan string
	buf   bytes.Buffer
}

func (p *pipeReader) String() string { return p.buf.String() }

var buildIDRE = regexp.MustCompile(`^build (\S+) (queued|running)`)

// waitFor reads lines until one matches re and returns the build id the
// CLI announced.
func (p *pipeReader) waitFor(t *testing.T, re string) string {
	t.Helper()
	want := regexp.MustCompile(re)
	id := ""
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("the CLI's stderr ended before %q:\n%s", re, p.String())
			}
			p.buf.WriteString(l + "\n")
			if m := buildIDRE.FindStringSubmatch(l); m != nil {
				id = m[1]
			}
			if want.MatchString(l) {
				if id == "" {
					t.Fatalf("no build id announced before %q:\n%s", re, p.String())
				}
				return id
			}
		case <-deadline:
			t.Fatalf("no %q on the CLI's stderr:\n%s", re, p.String())
		}
	}
}

// kilnStart starts the CLI with its stderr on a pipe the test reads (and
// may close).
func (s *server) kilnStart(token string, args ...string) (*exec.Cmd, *pipeReader) {
	s.t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		s.t.Fatal(err)
	}
	cmd := exec.Command(kilnBinary(s.t), args...)
	cmd.Env = append(os.Environ(), "KILN_ADDR=http://"+s.addr, "KILN_TOKEN="+token)
	cmd.Stderr = w
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	w.Close()
	p := &pipeReader{r: r, lines: make(chan string, 1024)}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	s.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		r.Close()
	})
	return cmd, p
}

func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the CLI did not exit within 20s")
		return -1
	}
}

// manifest fetches repo@digest from kiln's registry as any OCI client
// does (challenge, token exchange) and returns its media type and bytes.
func (s *server) manifest(token, repo, digest string) (string, []byte) {
	s.t.Helper()
	resp := s.registryGet(token, repo, "manifests/"+digest,
		"application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	sum := sha256.Sum256(body)
	if resp.StatusCode != http.StatusOK || "sha256:"+hex.EncodeToString(sum[:]) != digest {
		s.t.Fatalf("GET manifest %s@%s: %d %s", repo, digest, resp.StatusCode, body)
	}
	ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
	return ct, body
}
