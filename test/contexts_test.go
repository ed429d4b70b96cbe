package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
)

// kilnIn runs the real CLI with HOME and XDG_CONFIG_HOME at home and no
// KILN_ADDR, KILN_TOKEN or KILN_CONTEXT unless env sets them.
func kilnIn(t *testing.T, home string, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(kilnBinary(t), args...)
	for _, kv := range os.Environ() {
		switch strings.SplitN(kv, "=", 2)[0] {
		case "KILN_ADDR", "KILN_TOKEN", "KILN_CONTEXT", "HOME", "XDG_CONFIG_HOME":
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	cmd.Env = append(cmd.Env, "HOME="+home)
	cmd.Env = append(cmd.Env, env...)
	cmd.Dir = home
	return runSplit(t, cmd)
}

// Contexts through the real CLI against two real servers: once created
// and chosen, commands go to the context's server with its token, without
// --addr or --token; KILN_CONTEXT and --addr/--token still win.
func TestContextsSwitchServers(t *testing.T) {
	one, two := startServer(t), startServer(t)
	home := t.TempDir()
	tokOne := filepath.Join(home, "one.token")
	tokTwo := filepath.Join(home, "two.token")
	os.WriteFile(tokOne, []byte(one.admin+"\n"), 0o600)
	os.WriteFile(tokTwo, []byte(two.admin+"\n"), 0o600)

	// A build on server two only, so the answers tell the servers apart.
	code, resp := two.submit(two.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}})
	if code != http.StatusAccepted {
		t.Fatalf("submit to two: %d %s", code, resp)
	}
	var built api.Build
	if err := json.Unmarshal(resp, &built); err != nil {
		t.Fatal(err)
	}

	for _, c := range [][]string{
		{"context", "create", "one", "--addr", "http://" + one.addr, "--token-file", "one.token"},
		{"context", "create", "two", "--addr", "http://" + two.addr, "--token-file", tokTwo, "--progress", "plain"},
		{"context", "use", "one"},
	} {
		if out, errOut, code := kilnIn(t, home, nil, c...); code != 0 {
			t.Fatalf("kiln %v: exit %d\n%s%s", c, code, out, errOut)
		}
	}
	cfgPath := filepath.Join(home, ".config", "kiln", "config.yaml")
	st, err := os.Stat(cfgPath)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("config file: %v %v", err, st)
	}
	if raw, _ := os.ReadFile(cfgPath); strings.Contains(string(raw), one.admin) || !strings.Contains(string(raw), "token_file: "+tokOne) {
		t.Fatalf("config file:\n%s", raw)
	}

	out, _, code := kilnIn(t, home, nil, "context", "ls")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 4 || !strings.HasPrefix(lines[2], "one ") || !strings.HasSuffix(lines[2], "*") || strings.HasSuffix(lines[3], "*") {
		t.Fatalf("context ls:\n%s", out)
	}

	// Context one: no builds there.
	out, errOut, code := kilnIn(t, home, nil, "builds", "ls", "-q")
	if code != 0 || strings.TrimSpace(out) != "" {
		t.Fatalf("builds ls on context one: exit %d\n%s%s", code, out, errOut)
	}
	// Context two, by kiln context use and by KILN_CONTEXT.
	trim := strings.TrimSpace
	kilnIn(t, home, nil, "context", "use", "two")
	out, errOut, code = kilnIn(t, home, nil, "builds", "ls", "-q")
	if code != 0 || trim(out) != built.Id {
		t.Fatalf("builds ls on context two: exit %d, want %s\n%s%s", code, built.Id, out, errOut)
	}
	out, _, code = kilnIn(t, home, []string{"KILN_CONTEXT=one"}, "builds", "ls", "-q")
	if code != 0 || trim(out) != "" {
		t.Fatalf("KILN_CONTEXT=one should win over the current context two:\n%s", out)
	}
	// --addr/--token win over the context.
	out, _, code = kilnIn(t, home, nil, "builds", "ls", "-q", "--addr", "http://"+one.addr, "--token", one.admin)
	if code != 0 || trim(out) != "" {
		t.Fatalf("--addr should win over the context:\n%s", out)
	}
	// Completion asks the context's server.
	out, _, code = kilnIn(t, home, nil, "__complete", "builds", "show", "")
	if code != 0 || !strings.HasPrefix(out, built.Id+"\t") {
		t.Fatalf("completion of build ids on context two:\n%s", out)
	}
	out, _, _ = kilnIn(t, home, nil, "context", "show", "--format", "{{.context}} {{.address}} {{.progress}}")
	if trim(out) != fmt.Sprintf("two http://%s plain", two.addr) {
		t.Fatalf("context show: %q", out)
	}

	// A token file that went away is named.
	os.Remove(tokTwo)
	_, errOut, code = kilnIn(t, home, nil, "builds", "ls")
	if code == 0 || !strings.Contains(errOut, "cannot read its token file "+tokTwo) {
		t.Fatalf("missing token file: exit %d\n%s", code, errOut)
	}
	// An unknown context lists the names.
	_, errOut, code = kilnIn(t, home, []string{"KILN_CONTEXT=three"}, "builds", "ls")
	if code == 0 || !strings.Contains(errOut, "the contexts are: default, one, two") {
		t.Fatalf("unknown context: exit %d\n%s", code, errOut)
	}
	if _, errOut, code := kilnIn(t, home, nil, "context", "rm", "two"); code != 0 || !strings.Contains(errOut, "was the current context") {
		t.Fatalf("context rm two: %d %s", code, errOut)
	}
	// XDG_CONFIG_HOME moves the file.
	xdg := t.TempDir()
	kilnIn(t, home, []string{"XDG_CONFIG_HOME=" + xdg}, "context", "create", "x", "--addr", "http://"+one.addr)
	if _, err := os.Stat(filepath.Join(xdg, "kiln", "config.yaml")); err != nil {
		t.Fatalf("XDG_CONFIG_HOME: %v", err)
	}
}
