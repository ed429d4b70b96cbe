package solve

import (
	"strings"
	"testing"
)

func TestSolveOptGitContext(t *testing.T) {
	url := "https://example.com/r.git#" + strings.Repeat("a", 40) + ":app"
	opt, err := solveOpt(Request{ContextURL: url, DockerfileName: "docker/Dockerfile"})
	if err != nil {
		t.Fatal(err)
	}
	if opt.FrontendAttrs["context"] != url || opt.FrontendAttrs["filename"] != "docker/Dockerfile" {
		t.Errorf("attrs %v: want context=%s and the Dockerfile read from it", opt.FrontendAttrs, url)
	}
	if _, ok := opt.FrontendAttrs["dockerfilekey"]; ok || len(opt.LocalMounts) != 0 {
		t.Errorf("a git context with its own Dockerfile has local mounts %v, attrs %v", opt.LocalMounts, opt.FrontendAttrs)
	}

	// An inline Dockerfile comes from the local "dockerfile" mount.
	opt, err = solveOpt(Request{ContextURL: url, InlineDockerfile: true, DockerfileDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if opt.FrontendAttrs["dockerfilekey"] != "dockerfile" || opt.LocalMounts["dockerfile"] == nil || opt.LocalMounts["context"] != nil {
		t.Errorf("inline Dockerfile with a git context: attrs %v mounts %v", opt.FrontendAttrs, opt.LocalMounts)
	}

	if _, err := solveOpt(Request{ContextURL: "https://example.com/r.git"}); err == nil {
		t.Errorf("an unpinned context URL was accepted")
	}
	if _, err := solveOpt(Request{ContextURL: url, InlineDockerfile: true}); err == nil {
		t.Errorf("an inline Dockerfile without its dir was accepted")
	}
}
