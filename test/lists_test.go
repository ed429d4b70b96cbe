package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// jsonLines decodes --format json output: one object per line.
func jsonLines[T any](t *testing.T, out string) []T {
	t.Helper()
	var list []T
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		var v T
		if err := json.Unmarshal([]byte(l), &v); err != nil {
			t.Fatalf("not one JSON object per line (%v):\n%s", err, out)
		}
		list = append(list, v)
	}
	return list
}

// The lists read like a registry UI: user names by default with sizes,
// filters, JSON, templates and -q; build ids by unique prefix; failed
// builds name no image; logs tail and follow alike.
func TestListsThroughTheCLI(t *testing.T) {
	s := startServer(t)
	base := s.base()
	files := func(run string) map[string]string {
		return map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN %s\n", base, run)}
	}
	ok := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: files(`printf 'line-1\nline-2\nline-3\n' > /f && cat /f`),
		fields: [][2]string{{"tags", "lists/app:1"}, {"tags", "lists/web:2"}}}))
	failed := s.wait(s.admin, s.build(s.admin, submission{files: files("echo about-to-fail && false")}).Id, 0x7fffffff)
	if failed.Status != api.BuildStatusFailed {
		t.Fatalf("the failing build %s is %s", failed.Id, failed.Status)
	}
	kiln := func(args ...string) string {
		t.Helper()
		out, errOut, code := s.kilnSplit(s.admin, nil, args...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		return out
	}

	t.Run("images ls hides per-build names unless --all", func(t *testing.T) {
		out := kiln("images", "ls")
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if f := strings.Fields(lines[0]); strings.Join(f, " ") != "NAME DIGEST SIZE BUILD CREATED" {
			t.Errorf("header %q", lines[0])
		}
		for _, want := range []string{"base/busybox:latest", "lists/app:1", "lists/web:2"} {
			if !strings.Contains(out, want) {
				t.Errorf("images ls lacks %s:\n%s", want, out)
			}
		}
		if strings.Contains(out, "builds/") {
			t.Errorf("images ls shows per-build names:\n%s", out)
		}
		if all := kiln("images", "ls", "--all"); !strings.Contains(all, "builds/"+ok.Id+":latest") {
			t.Errorf("images ls --all lacks builds/%s:latest:\n%s", ok.Id, all)
		}
		if q := kiln("images", "ls", "-q"); q != "base/busybox:latest\nlists/app:1\nlists/web:2\n" {
			t.Errorf("images ls -q:\n%s", q)
		}
	})

	t.Run("sizes are the manifest's config and layers", func(t *testing.T) {
		out := kiln("images", "ls", "--format", "json", "lists/app")
		list := jsonLines[api.Image](t, out)
		if len(list) != 1 || list[0].Name != "lists/app:1" || list[0].Size == nil {
			t.Fatalf("images ls --format json lists/app:\n%s", out)
		}
		raw, err := exec.Command("skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+s.admin,
			"docker://"+s.addr+"/lists/app:1").Output()
		if err != nil {
			t.Fatalf("skopeo inspect --raw: %v", err)
		}
		var m struct {
			Config struct{ Size int64 }
			Layers []struct{ Size int64 }
		}
		if err := json.Unmarshal(raw, &m); err != nil || m.Config.Size == 0 || len(m.Layers) == 0 {
			t.Fatalf("manifest of lists/app:1 (%v):\n%s", err, raw)
		}
		want := m.Config.Size
		for _, l := range m.Layers {
			want += l.Size
		}
		if *list[0].Size != want {
			t.Errorf("size %d, the manifest says %d:\n%s", *list[0].Size, want, raw)
		}
		table := kiln("images", "ls", "lists/app:1")
		if !regexp.MustCompile(`lists/app:1\s+sha256:[0-9a-f]{12}\s+[0-9.]+ (B|KiB|MiB)\s`).MatchString(table) {
			t.Errorf("the table has no size for lists/app:1:\n%s", table)
		}
		if tm := kiln("images", "ls", "--format", "{{.name}}={{.size}}", "lists/app"); tm != fmt.Sprintf("lists/app:1=%d\n", want) {
			t.Errorf("template: %q", tm)
		}
	})

	t.Run("filters", func(t *testing.T) {
		for filter, want := range map[string]string{
			"lists/":   "lists/app:1\nlists/web:2\n",
			"lists/*":  "lists/app:1\nlists/web:2\n",
			"*/web":    "lists/web:2\n",
			"base":     "base/busybox:latest\n",
			"nothing/": "",
		} {
			if got := kiln("images", "ls", "-q", filter); got != want {
				t.Errorf("images ls -q %s: %q, want %q", filter, got, want)
			}
		}
		if got := kiln("images", "ls", "-q", "--all", "builds/"+ok.Id[:20]); got != "builds/"+ok.Id+":latest\n" {
			t.Errorf("images ls --all builds/<prefix>: %q", got)
		}
	})

	t.Run("a failed build names no image", func(t *testing.T) {
		out := kiln("builds", "show", "--format", "json", failed.Id)
		var raw map[string]any
		if err := json.Unmarshal([]byte(out), &raw); err != nil {
			t.Fatalf("builds show --format json: %v\n%s", err, out)
		}
		if im, has := raw["image"]; has {
			t.Errorf("the failed build names image %v", im)
		}
		if text := kiln("builds", "show", failed.Id); strings.Contains(text, "image:") {
			t.Errorf("builds show of a failed build shows an image:\n%s", text)
		}
		out = kiln("builds", "show", "--format", "json", ok.Id)
		var b api.Build
		if err := json.Unmarshal([]byte(out), &b); err != nil || b.Image != "builds/"+ok.Id+":latest" {
			t.Errorf("the succeeded build's image %q (%v)", b.Image, err)
		}
	})

	t.Run("builds ls, cache ls, builders ls take --format json and -q", func(t *testing.T) {
		builds := jsonLines[api.Build](t, kiln("builds", "ls", "--format", "json"))
		var ids []string
		for _, b := range builds {
			ids = append(ids, b.Id)
		}
		if len(builds) < 3 || builds[0].Id != failed.Id || builds[1].Id != ok.Id {
			t.Errorf("builds ls --format json: %v", ids)
		}
		if q := kiln("builds", "ls", "-q"); q != strings.Join(ids, "\n")+"\n" {
			t.Errorf("builds ls -q: %q, want %q", q, ids)
		}
		if tm := kiln("builds", "ls", "--limit", "2", "--format", "{{.id}} {{.status}}"); tm != failed.Id+" failed\n"+ok.Id+" succeeded\n" {
			t.Errorf("builds ls template: %q", tm)
		}
		vols := jsonLines[api.CacheVolume](t, kiln("cache", "ls", "--format", "json"))
		if len(vols) == 0 || vols[0].Scope == "" {
			t.Errorf("cache ls --format json: %v", vols)
		}
		if q := kiln("cache", "ls", "-q"); !strings.Contains(q, vols[0].Scope+"\n") {
			t.Errorf("cache ls -q: %q", q)
		}
		// builders ls works the same whether or not a builder is kept up.
		builders := jsonLines[api.Builder](t, kiln("builders", "ls", "--format", "json"))
		var scopes string
		for _, b := range builders {
			scopes += b.Scope + "\n"
		}
		if q := kiln("builders", "ls", "-q"); q != scopes {
			t.Errorf("builders ls -q %q, --format json scopes %q", q, scopes)
		}
	})

	t.Run("build ids by unique prefix", func(t *testing.T) {
		if q := kiln("builds", "show", "-q", ok.Id[:12]); q != ok.Id+"\n" {
			t.Errorf("builds show -q %s: %q", ok.Id[:12], q)
		}
		if text := kiln("builds", "show", ok.Id[:12]); !strings.Contains(text, ok.Id) || !strings.Contains(text, "succeeded") {
			t.Errorf("builds show %s:\n%s", ok.Id[:12], text)
		}
		// Every id starts with b: ambiguous, and the candidates are listed.
		out, errOut, code := s.kilnSplit(s.admin, nil, "builds", "show", "b")
		if code != 1 || !strings.Contains(errOut, "ambiguous") || !strings.Contains(errOut, ok.Id) || !strings.Contains(errOut, failed.Id) {
			t.Errorf("an ambiguous prefix: exit %d\n%s%s", code, out, errOut)
		}
		// A tenant resolves only among its own builds.
		other := s.token("lists-other", "lists-other", "build:read")
		if _, errOut, code := s.kilnSplit(other, nil, "builds", "show", ok.Id[:12]); code != 1 || !strings.Contains(errOut, "no build") {
			t.Errorf("another tenant resolves the admin's build: exit %d\n%s", code, errOut)
		}
	})

	t.Run("logs and logs -f print the same lines; --tail", func(t *testing.T) {
		plain := kiln("builds", "logs", ok.Id[:12])
		followed, errOut, code := s.kilnSplit(s.admin, nil, "builds", "logs", "-f", ok.Id)
		if code != 0 || followed != plain {
			t.Errorf("logs -f (exit %d) differs from logs:\n--- logs\n%s--- logs -f\n%s--- stderr\n%s", code, plain, followed, errOut)
		}
		if !strings.Contains(plain, " | line-2\n") {
			t.Errorf("the log lacks the RUN output:\n%s", plain)
		}
		lines := strings.SplitAfter(plain, "\n")
		lines = lines[:len(lines)-1]
		want := strings.Join(lines[len(lines)-2:], "")
		if got := kiln("builds", "logs", "--tail", "2", ok.Id); got != want {
			t.Errorf("logs --tail 2: %q, want %q", got, want)
		}
		if got, _, _ := s.kilnSplit(s.admin, nil, "builds", "logs", "-f", "--tail", "2", ok.Id); got != want {
			t.Errorf("logs -f --tail 2 of a finished build: %q, want %q", got, want)
		}

		// A running build: the last line so far, then the rest as it
		// comes, each line once.
		run := s.build(s.admin, submission{files: files("echo before-sleep && sleep 2 && echo after-sleep")})
		deadline := time.Now().Add(time.Minute)
		for !strings.Contains(s.logText(s.admin, run.Id), "before-sleep") {
			if time.Now().After(deadline) {
				t.Fatalf("build %s never printed before-sleep:\n%s", run.Id, s.logText(s.admin, run.Id))
			}
			time.Sleep(50 * time.Millisecond)
		}
		followed, errOut, code = s.kilnSplit(s.admin, nil, "builds", "logs", "-f", "--tail", "1", run.Id)
		final := s.logText(s.admin, run.Id)
		if code != 0 || !strings.HasSuffix(final, followed) || !strings.Contains(followed, "| after-sleep\n") {
			t.Errorf("logs -f --tail 1 of a running build (exit %d):\n%s--- stderr\n%s--- the whole log\n%s", code, followed, errOut, final)
		}
		if strings.Count(followed, "\n") >= strings.Count(final, "\n") {
			t.Errorf("logs -f --tail 1 printed the whole log:\n%s", followed)
		}
	})
}

// kiln version prints the client's version and the server's, with the
// BuildKit it builds with; without a server, the client part and exit 1.
func TestVersionClientAndServer(t *testing.T) {
	s := startServer(t)
	tok := s.token("reader", "reader", "build:read")
	out, errOut, code := s.kilnSplit(tok, nil, "version")
	if code != 0 {
		t.Fatalf("kiln version: exit %d\n%s%s", code, out, errOut)
	}
	client, server, found := strings.Cut(out, "\nServer: http://"+s.addr+"\n")
	if !found || !strings.HasPrefix(client, "Client:\n") {
		t.Fatalf("want Client and Server sections:\n%s", out)
	}
	for _, want := range []string{" Version:", " Go version:", " OS/Arch:"} {
		if !strings.Contains(client, want) || !strings.Contains(server, want) {
			t.Errorf("a section lacks %q:\n%s", want, out)
		}
	}
	if !regexp.MustCompile(`(?m)^ BuildKit:\s+v0\.\d+\.\d+`).MatchString(server) {
		t.Errorf("the server section lacks BuildKit's version:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^ Runtime:\s+(process|vm)$`).MatchString(server) {
		t.Errorf("the server section lacks the runtime:\n%s", out)
	}

	out, _, code = s.kilnSplit(tok, nil, "version", "--format", "json")
	var v struct {
		Client struct{ Version, BuildKit string }
		Server *api.ServerVersion
	}
	if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil || v.Server == nil {
		t.Fatalf("version --format json: exit %d (%v)\n%s", code, err, out)
	}
	if v.Server.Version != v.Client.Version || v.Server.Buildkit != v.Client.BuildKit {
		t.Errorf("the same binary reports client %+v and server %+v", v.Client, *v.Server)
	}
	if v.Server.Runtime == "vm" && v.Server.BuilderImage == nil {
		t.Errorf("the vm runtime reports no builder image: %+v", *v.Server)
	}
	if got, _, _ := s.kilnSplit(tok, nil, "version", "--format", "{{.server.buildkit}}"); strings.TrimSpace(got) != v.Server.Buildkit {
		t.Errorf("version template: %q", got)
	}

	// Without a server: the client part, the reason, exit 1.
	cmd := exec.Command(kilnBinary(t), "version", "--addr", "http://127.0.0.1:1", "--token", "x")
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, isExit := err.(*exec.ExitError); !isExit || ee.ExitCode() != 1 {
		t.Errorf("kiln version without a server: %v, want exit 1", err)
	}
	if !strings.HasPrefix(o.String(), "Client:\n") || strings.Contains(o.String(), "Server") || !strings.Contains(e.String(), "cannot reach kiln") {
		t.Errorf("kiln version without a server:\n%s---\n%s", o.String(), e.String())
	}
}
