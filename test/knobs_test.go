package test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
)

// docker build's everyday knobs through kiln build: labels and
// annotations land on the image, --add-host, --shm-size and --ulimit
// reach RUN, and --load says what to do instead.
func TestBuildxEverydayFlags(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(fmt.Sprintf("FROM %s\n"+
		"RUN grep db.internal /etc/hosts && df -k /dev/shm | tail -1 && echo nofile=$(ulimit -n)\n", s.base())), 0o644)
	stdout, stderr, code := s.kilnSplit(s.admin, nil, "build", "-q", "-t", "knobs/app:1",
		"--label", "org.opencontainers.image.source=https://example.com/knobs", "--annotation", "com.example.note=annotated",
		"--add-host", "db.internal:10.9.8.7", "--shm-size", "96m", "--ulimit", "nofile=777:777", dir)
	if code != 0 {
		t.Fatalf("kiln build: exit %d\n%s", code, stderr)
	}
	digest := strings.TrimSpace(stdout)
	var list api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds", nil, http.StatusOK, &list)
	var id string
	for _, b := range list.Builds {
		if b.ImageDigest != nil && *b.ImageDigest == digest {
			id = b.Id
		}
	}
	log := s.logText(s.admin, id)
	for _, want := range []string{"10.9.8.7", "98304", "nofile=777"} {
		if !strings.Contains(log, want) {
			t.Errorf("RUN did not see %q:\n%s", want, log)
		}
	}
	_, manifest := s.manifest(s.admin, "knobs/app", digest)
	if !strings.Contains(string(manifest), `"com.example.note": "annotated"`) && !strings.Contains(string(manifest), `"com.example.note":"annotated"`) {
		t.Errorf("the manifest lacks the annotation: %s", manifest)
	}
	out, _, code := s.kilnSplit(s.admin, nil, "images", "ls", "knobs/app", "--format", "json")
	if code != 0 || !strings.Contains(out, "knobs/app:1") {
		t.Errorf("images ls: %s", out)
	}
	_, stderr, code = s.kilnSplit(s.admin, nil, "build", "--load", dir)
	if code != 2 || !strings.Contains(stderr, "type=docker,dest=") {
		t.Errorf("--load: exit %d, %s", code, stderr)
	}
}
