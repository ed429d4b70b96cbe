package test

import (
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// keyLine is a line from the middle of a private key file: what any copy
// of the key, whole or in part, would hold.
func keyLine(k testkit.SSHKey) []byte {
	lines := strings.Split(strings.TrimSpace(string(k.Private)), "\n")
	return []byte(lines[len(lines)/2])
}

// kiln build --ssh, as buildx has it: the caller's running ssh-agent is
// forwarded for the build's duration (the key never leaves the agent),
// and key files are served from the server's memory; neither a key nor
// the agent's socket path is written anywhere on the server. An API
// client that asks for an agent and opens no session gets a build that
// fails saying how to open one.
func TestSSHForwardsTheCallersAgentAndKeyFiles(t *testing.T) {
	s := startServer(t, withArgs("--builds-ssh-session-wait", "3s"))
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	ag := testkit.StartSSHAgent(t, t.TempDir())
	t.Setenv("SSH_AUTH_SOCK", ag.Socket)

	// The caller's agent, forwarded: RUN --mount=type=ssh sees its key.
	out, code := s.kiln(tok, "build", "--progress", "plain", "--ssh", "default", "-t", "sshagent:1", testkit.SSHListContext(t, ",required=true"))
	if code != 0 {
		t.Fatalf("kiln build --ssh default: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"key " + ag.Key.Fingerprint, "signed " + ag.Key.Fingerprint} {
		if !strings.Contains(out, want) {
			t.Errorf("the step's output lacks %q:\n%s", want, out)
		}
	}

	// A key file, sent with the build: RUN --mount=type=ssh,id=deploy
	// sees that key and no other.
	deploy := testkit.NewSSHKey(t, t.TempDir(), "deploy")
	out, code = s.kiln(tok, "build", "--progress", "plain", "--ssh", "deploy="+deploy.File, testkit.SSHListContext(t, ",id=deploy,required=true"))
	if code != 0 {
		t.Fatalf("kiln build --ssh deploy=KEYFILE: exit %d:\n%s", code, out)
	}
	if !strings.Contains(out, "signed "+deploy.Fingerprint) || strings.Contains(out, ag.Key.Fingerprint) {
		t.Errorf("the step's output should list the deploy key only:\n%s", out)
	}

	// Through the API without a session: a clear error, not a hang.
	b := s.build(tok, submission{
		files:  map[string]string{"Dockerfile": "FROM scratch\nRUN --mount=type=ssh [\"/nothing\"]\n"},
		fields: [][2]string{{"ssh", "default"}},
	})
	b = s.wait(tok, b.Id, time.Minute)
	if b.Status != api.BuildStatusFailed || b.Error == nil || !strings.Contains(*b.Error, "/v1/builds/"+b.Id+"/ssh") || !strings.Contains(*b.Error, "kiln build --ssh") {
		t.Errorf("an ssh build without a session: %s, error %v; want it failed saying how to open the session", b.Status, b.Error)
	}

	// Nothing of the keys or the agent's whereabouts is on the server.
	s.stop()
	needles := [][]byte{keyLine(ag.Key), keyLine(deploy), []byte(ag.Socket)}
	found, err := testkit.FindBytes(s.data, needles...)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Errorf("%s holds a private key or the agent's socket path", f)
	}
	// The scan sees what the builds left: the step's program is on the
	// cache volume.
	if found, err := testkit.FindBytes(s.data, []byte("SSH_AUTH_SOCK is not set")); err != nil || len(found) == 0 {
		t.Errorf("the scan of the data dir found not even the step's program (%v): it would miss a key too", err)
	}
	for _, n := range needles {
		if strings.Contains(s.logs(), string(n)) {
			t.Errorf("the server log holds %q", n)
		}
	}
}

// In a builder VM the step's agent connections come back to the host
// through the job's tunnel and go on to the caller's agent, or to the key
// file in the server's memory; the guest never holds a key. One build:
// TCG boots are slow.
func TestSSHReachesTheBuilderVM(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	builder := testkit.BuilderImage(t)
	s := startServer(t, withArgs("--runtime", "vm", "--builder-image", builder.Dir))
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	ag := testkit.StartSSHAgent(t, t.TempDir())
	t.Setenv("SSH_AUTH_SOCK", ag.Socket)
	deploy := testkit.NewSSHKey(t, t.TempDir(), "deploy")

	dir := testkit.SSHListContext(t, ",required=true")
	testkit.WriteFiles(t, dir, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY sshlist /sshlist\n" +
			"RUN --mount=type=ssh,required=true [\"/sshlist\"]\n" +
			"RUN --mount=type=ssh,id=deploy,required=true [\"/sshlist\"]\n",
	})
	out, code := s.kiln(tok, "build", "--progress", "plain", "--ssh", "default", "--ssh", "deploy="+deploy.File, dir)
	if code != 0 {
		t.Fatalf("kiln build --ssh in a VM: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"signed " + ag.Key.Fingerprint, "signed " + deploy.Fingerprint} {
		if !strings.Contains(out, want) {
			t.Errorf("the steps' output lacks %q:\n%s", want, out)
		}
	}
	s.stop()
	found, err := testkit.FindBytes(s.data, keyLine(ag.Key), keyLine(deploy), []byte(ag.Socket))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Errorf("%s holds a private key or the agent's socket path", f)
	}
}
