package test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln runs the real CLI binary against s.
func (s *server) kiln(token string, args ...string) (string, int) {
	s.t.Helper()
	cmd := exec.Command(kilnBinary(s.t), args...)
	cmd.Env = append(os.Environ(), "KILN_ADDR=http://"+s.addr, "KILN_TOKEN="+token)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		s.t.Fatal(err)
	}
	return out.String(), code
}

func TestCLIBuildsThroughTheServer(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")

	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{
		"Dockerfile":    fmt.Sprintf("FROM %s\nARG NAME\nCOPY . /src\nRUN --mount=type=secret,id=tok test -s /run/secrets/tok && ls /src && echo hello-$NAME\n", base),
		"keep.txt":      "kept",
		"ignored.log":   "must not be sent",
		".dockerignore": "*.log\n",
	})
	secretFile := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(secretFile, []byte("cli-secret"), 0o600)

	// A tenant's one-component name lands in its namespace (dev/app:1);
	// a name in another namespace is refused.
	if out, code := s.kiln(tok, "build", "-t", "cli/app:1", dir); code == 0 || !strings.Contains(out, "dev/") {
		t.Errorf("kiln build -t cli/app:1 by tenant dev: exit %d, want a refusal naming its namespace dev/\n%s", code, out)
	}
	out, code := s.kiln(tok, "build", "--progress", "plain", "-t", "app:1", "--build-arg", "NAME=kiln",
		"--secret", "id=tok,src="+secretFile, dir)
	if code != 0 {
		t.Fatalf("kiln build exit %d:\n%s", code, out)
	}
	digest := regexp.MustCompile(`sha256:[0-9a-f]{64}`).FindString(out)
	if digest == "" {
		t.Fatalf("kiln build printed no digest:\n%s", out)
	}
	if !strings.Contains(out, "hello-kiln") || !strings.Contains(out, "keep.txt") {
		t.Errorf("build output lacks the RUN output:\n%s", out)
	}
	if !strings.Contains(out, "image app:1 is named dev/app:1") {
		t.Errorf("kiln build does not say where app:1 went:\n%s", out)
	}
	if strings.Contains(out, "ignored.log") {
		t.Errorf(".dockerignore'd file reached the build:\n%s", out)
	}
	if strings.Contains(out, "cli-secret") {
		t.Errorf("secret printed")
	}

	// The JSON progress is one object per line.
	out, code = s.kiln(tok, "build", "--progress", "json", "--build-arg", "NAME=kiln", "--secret", "id=tok,src="+secretFile, dir)
	if code != 0 {
		t.Fatalf("kiln build --progress json exit %d:\n%s", code, out)
	}
	if !strings.Contains(out, `"kind":"vertex.cached"`) {
		t.Errorf("second CLI build shows no cached vertex:\n%s", out)
	}

	// A failing build exits non-zero with its error.
	bad := t.TempDir()
	testkit.WriteFiles(t, bad, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo about-to-fail && false\n", base)})
	out, code = s.kiln(tok, "build", "--progress", "plain", bad)
	if code != 1 || !strings.Contains(out, "about-to-fail") {
		t.Errorf("failing build: exit %d\n%s", code, out)
	}

	out, code = s.kiln(tok, "builds", "ls")
	if code != 0 || !strings.Contains(out, "succeeded") || !strings.Contains(out, "failed") {
		t.Errorf("builds ls: exit %d\n%s", code, out)
	}
	out, code = s.kiln(tok, "images", "ls")
	if code != 0 || !strings.Contains(out, "dev/app:1") || !strings.Contains(out, digest[:19]) {
		t.Errorf("images ls: exit %d\n%s", code, out)
	}

	// token create needs the admin token and prints only the token.
	out, code = s.kiln(s.admin, "token", "create", "--subject", "bot", "--scope", "build:read", "--ttl", "1h")
	if code != 0 || strings.Count(strings.TrimSpace(out), ".") != 2 {
		t.Errorf("token create: exit %d %q", code, out)
	}
	if _, code = s.kiln(tok, "token", "create", "--subject", "bot", "--scope", "build:read"); code == 0 {
		t.Errorf("token create with a non-admin token succeeded")
	}
}
