package test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

func TestBadInputIsRejectedAndLeavesNothing(t *testing.T) {
	s := startServer(t, withArgs("--context-max-bytes", "4MiB"))
	ok := map[string]string{"Dockerfile": "FROM scratch\nCOPY a /a\n", "a": "x"}
	tarWith := func(h tar.Header, body string) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: "Dockerfile", Mode: 0o644, Size: 11, Typeflag: tar.TypeReg})
		tw.Write([]byte("FROM scratch"))
		h.Size = int64(len(body))
		tw.WriteHeader(&h)
		tw.Write([]byte(body))
		tw.Close()
		return buf.Bytes()
	}
	big := bytes.Repeat([]byte("z"), 5<<20)
	cases := []struct {
		name string
		sub  submission
		want int
		msg  string
	}{
		{"no context", submission{context: []byte{}, files: nil}, 400, "context"},
		{"garbage context", submission{context: []byte("this is not a tar archive at all, not even close....")}, 400, ""},
		{"dotdot entry", submission{context: tarWith(tar.Header{Name: "../evil", Mode: 0o644, Typeflag: tar.TypeReg}, "x")}, 400, "evil"},
		{"absolute entry", submission{context: tarWith(tar.Header{Name: "/etc/evil", Mode: 0o644, Typeflag: tar.TypeReg}, "x")}, 400, "evil"},
		{"symlink escape", submission{context: tarWith(tar.Header{Name: "l", Linkname: "../../etc/passwd", Typeflag: tar.TypeSymlink}, "")}, 400, ""},
		{"hardlink outside", submission{context: tarWith(tar.Header{Name: "h", Linkname: "/etc/passwd", Typeflag: tar.TypeLink}, "")}, 400, ""},
		{"oversize context", submission{files: map[string]string{"Dockerfile": "FROM scratch\n", "big": string(big)}}, 413, "limit"},
		{"bad build arg name", submission{files: ok, fields: [][2]string{{"build_args", `{"1BAD":"x"}`}}}, 400, "1BAD"},
		{"build args not json", submission{files: ok, fields: [][2]string{{"build_args", `VERSION=1`}}}, 400, "build_args"},
		{"unknown target", submission{files: ok, fields: [][2]string{{"target", "nope"}}}, 400, "nope"},
		{"dockerfile syntax error", submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY\n"}}, 400, "Dockerfile"},
		{"missing dockerfile", submission{files: map[string]string{"a": "x"}}, 400, "Dockerfile"},
		{"bad tag", submission{files: ok, fields: [][2]string{{"tags", "Bad Name!"}}}, 400, "Bad Name!"},
		{"reserved tag", submission{files: ok, fields: [][2]string{{"tags", "builds/mine"}}}, 400, "reserved"},
		{"over cpu cap", submission{files: ok, fields: [][2]string{{"cpus", "999"}}}, 400, "limits.cpus"},
		{"unknown field", submission{files: ok, fields: [][2]string{{"colour", "red"}}}, 400, "colour"},
		{"dockerfile path escape", submission{files: ok, fields: [][2]string{{"dockerfile_path", "../Dockerfile"}}}, 400, "dockerfile_path"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sub := c.sub
			if c.name == "no context" {
				body := "--x\r\nContent-Disposition: form-data; name=\"target\"\r\n\r\nx\r\n--x--\r\n"
				resp := s.do(s.admin, "POST", "/v1/builds", strings.NewReader(body), "multipart/form-data; boundary=x")
				resp.Body.Close()
				if resp.StatusCode != c.want {
					t.Errorf("status %d, want %d", resp.StatusCode, c.want)
				}
				return
			}
			code, body := s.submit(s.admin, sub)
			if code != c.want {
				t.Fatalf("status %d, want %d: %s", code, c.want, body)
			}
			if !strings.Contains(string(body), c.msg) || !strings.Contains(string(body), `"error"`) {
				t.Errorf("error body %s does not mention %q", body, c.msg)
			}
		})
	}
	t.Run("field limits", func(t *testing.T) {
		var tags [][2]string
		for i := 0; i <= 32; i++ {
			tags = append(tags, [2]string{"tags", fmt.Sprintf("app:%d", i)})
		}
		if code, body := s.submit(s.admin, submission{files: ok, fields: tags}); code != 400 || !strings.Contains(string(body), "tags") {
			t.Errorf("33 tags: status %d: %s", code, body)
		}
		long := "app:" + strings.Repeat("x", 600)
		code, body := s.submit(s.admin, submission{files: ok, fields: [][2]string{{"tags", long}}})
		if code != 400 || !strings.Contains(string(body), "tags") {
			t.Errorf("600-byte tag: status %d: %s", code, body)
		}
		if strings.Contains(string(body), strings.Repeat("x", 100)) {
			t.Errorf("the error echoes the oversized value: %s", body)
		}
	})
	t.Run("malformed multipart", func(t *testing.T) {
		resp := s.do(s.admin, "POST", "/v1/builds", strings.NewReader("--x\r\nbroken"), "multipart/form-data; boundary=x")
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("status %d", resp.StatusCode)
		}
		resp = s.do(s.admin, "POST", "/v1/builds", strings.NewReader("{}"), "application/json")
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("json body: status %d", resp.StatusCode)
		}
	})
	t.Run("expired token", func(t *testing.T) {
		var tok api.Token
		s.doJSON(s.admin, "POST", "/v1/tokens", map[string]any{"subject": "x", "scopes": []string{"build:write"}, "ttl": "1ms"}, http.StatusCreated, &tok)
		code, body := s.submit(tok.Token, submission{files: ok})
		if code != 401 || !strings.Contains(string(body), "expired") {
			t.Errorf("status %d: %s", code, body)
		}
	})

	// Nothing was recorded and nothing is left on disk.
	var list api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds", nil, http.StatusOK, &list)
	if len(list.Builds) != 0 {
		t.Errorf("rejected submissions left %d build records", len(list.Builds))
	}
	if left := s.contextEntries(); len(left) != 0 {
		t.Errorf("rejected submissions left contexts on disk: %v", left)
	}

	// A Dockerfile that parses but fails in BuildKit is a failed build
	// with BuildKit's message, and its context is cleaned up.
	b := s.wait(s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY missing-file /x\n"}}).Id, 5*time.Minute)
	if b.Status != api.BuildStatusFailed || b.Error == nil || !strings.Contains(*b.Error, "missing-file") {
		t.Errorf("failing build: status %s error %v", b.Status, b.Error)
	}
	if left := s.contextEntries(); len(left) != 0 {
		t.Errorf("failed build left its context on disk: %v", left)
	}
}

// grepTree searches dir for needle (binary files included) and returns
// matching paths.
func grepTree(t *testing.T, dir, needle string) string {
	out, _ := exec.Command("grep", "-rl", "--", needle, dir).Output()
	return strings.TrimSpace(string(out))
}

var _ = fmt.Sprintf
