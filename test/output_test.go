package test

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln build --output writes the result where docker buildx would: the
// final stage's files into a directory, a tar of them to a file or to
// standard output, an OCI image tarball that skopeo (and docker load)
// import, and extra names in kiln's registry.
func TestBuildOutputs(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	dir := t.TempDir()
	testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s AS build
RUN mkdir -p /out/bin && echo artifact > /out/bin/app && chmod 755 /out/bin/app && ln -s bin/app /out/latest && ln /out/bin/app /out/same
FROM scratch
COPY --from=build /out /
`, base)})

	local, tarFile, ociFile := filepath.Join(t.TempDir(), "dist"), filepath.Join(t.TempDir(), "fs.tar"), filepath.Join(t.TempDir(), "img.tar")
	out, code := s.kiln(tok, "build", "--progress", "plain", "-t", "app:1",
		"-o", "type=local,dest="+local, "-o", "type=tar,dest="+tarFile, "-o", "type=docker,dest="+ociFile, "-o", "type=image,name=app:also", dir)
	if code != 0 {
		t.Fatalf("kiln build with outputs: exit %d\n%s", code, out)
	}
	if data, err := os.ReadFile(filepath.Join(local, "bin", "app")); err != nil || string(data) != "artifact\n" {
		t.Errorf("local output bin/app = %q, %v", data, err)
	}
	if st, err := os.Stat(filepath.Join(local, "bin", "app")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("local output lost bin/app's mode: %v %v", st, err)
	}
	if target, err := os.Readlink(filepath.Join(local, "latest")); err != nil || target != "bin/app" {
		t.Errorf("local output symlink latest → %q, %v", target, err)
	}
	a, _ := os.Stat(filepath.Join(local, "bin", "app"))
	b, _ := os.Stat(filepath.Join(local, "same"))
	if a == nil || b == nil || !os.SameFile(a, b) {
		t.Errorf("local output lost the hard link between bin/app and same")
	}
	f, err := os.Open(tarFile)
	if err != nil {
		t.Fatal(err)
	}
	names := tarEntries(t, f)
	f.Close()
	if !strings.Contains(names, "bin/app") || !strings.Contains(names, "latest") {
		t.Errorf("tar output entries: %s", names)
	}
	if out, err := exec.Command("skopeo", "inspect", "oci-archive:"+ociFile).CombinedOutput(); err != nil || !strings.Contains(string(out), "sha256:") {
		t.Errorf("skopeo cannot read the oci output: %v\n%s", err, out)
	}
	// Names of tenant dev's build land in its namespace.
	if !skopeoOK("kiln:"+tok, "docker://"+s.addr+"/dev/app:also") || !skopeoOK("kiln:"+tok, "docker://"+s.addr+"/dev/app:1") {
		t.Errorf("type=image,name= did not add the name dev/app:also in kiln's registry")
	}

	// "-o -": the tar owns standard output, progress goes to stderr.
	cmd := exec.Command(kilnBinary(t), "build", "--progress", "plain", "-o", "-", dir)
	cmd.Env = append(os.Environ(), "KILN_ADDR=http://"+s.addr, "KILN_TOKEN="+tok)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kiln build -o -: %v\n%s", err, stderr.String())
	}
	if names := tarEntries(t, &stdout); !strings.Contains(names, "bin/app") {
		t.Errorf("tar on stdout: %s", names)
	}
	if !strings.Contains(stderr.String(), "succeeded") {
		t.Errorf("progress did not go to stderr:\n%s", stderr.String())
	}

	for _, bad := range []string{"type=local", "type=zip,dest=x", "type=image,dest=x", "dest=x"} {
		out, code := s.kiln(tok, "build", "-o", bad, dir)
		if code != 2 || !strings.Contains(out, "--output") {
			t.Errorf("--output %s: exit %d, want a usage error naming --output\n%s", bad, code, out)
		}
	}
	// The API refuses unknown types, unfinished builds, tokens without
	// image:read, and other tenants' builds (as if they did not exist).
	b2 := s.build(s.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}})
	mustSucceed(t, s, s.admin, b2)
	failed := s.wait(s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY missing /m\n"}}).Id, time.Minute)
	for _, tc := range []struct {
		tok, id, query string
		want           int
	}{
		{s.admin, b2.Id, "?type=zip", http.StatusBadRequest},
		{s.token("nob", "nob", "build:read"), b2.Id, "", http.StatusForbidden},
		{s.token("nob", "nob", "build:read", "image:read"), b2.Id, "", http.StatusNotFound},
		{s.admin, failed.Id, "", http.StatusConflict},
		{s.admin, "no-such-build", "", http.StatusNotFound},
	} {
		if resp := s.do(tc.tok, "GET", "/v1/builds/"+tc.id+"/output"+tc.query, nil, ""); resp.StatusCode != tc.want {
			t.Errorf("output of %s%s: %d, want %d", tc.id, tc.query, resp.StatusCode, tc.want)
		}
	}
}

func tarEntries(t *testing.T, r io.Reader) string {
	t.Helper()
	tr := tar.NewReader(r)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return strings.Join(names, " ")
		}
		if err != nil {
			t.Fatalf("read tar: %v (after %v)", err, names)
		}
		names = append(names, h.Name)
	}
}
