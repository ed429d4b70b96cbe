package test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln build --call check (--check) runs the Dockerfile's checks as
// docker build --check does: warnings with their lines on stdout, exit
// status 1 if there are any, 0 if none, and no image either way.
func TestCallCheckReportsLintWarnings(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s as build\nRUN exit 3\n", base),
	})
	stdout, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "--call", "check", dir)
	if code != 1 || !strings.Contains(stdout, "FromAsCasing") || !strings.Contains(stdout, "as build") || !strings.Contains(stderr, "1 warning") {
		t.Errorf("--call check of a Dockerfile with a casing warning: exit %d, want 1 with the warning on stdout\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if strings.Contains(stderr, "exit code: 3") {
		t.Error("--call check ran the RUN step")
	}
	if out, _ := s.kiln(tok, "images", "ls", "--all"); strings.Contains(out, "builds/") {
		t.Errorf("a check left an image:\n%s", out)
	}

	clean := testkit.ContextDir(t, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s AS build\nRUN exit 3\n", base)})
	stdout, stderr, code = s.kilnSplit(tok, nil, "build", "--progress", "quiet", "--check", clean)
	if code != 0 || !strings.Contains(stdout, "no warnings") {
		t.Errorf("--check of a clean Dockerfile: exit %d, want 0\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--check", "-t", "app:1", clean); code != 2 || !strings.Contains(stderr, "drop -t") {
		t.Errorf("--check with -t: exit %d, want a usage error\n%s", code, stderr)
	}
}
