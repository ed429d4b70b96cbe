package cli

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/testkit"
)

// sshSeen is what the fake server's end of the ssh session found.
type sshSeen struct {
	upgrade     string
	keys        []string
	removeErr   error
	otherErr    error
	keysAfterRm int
}

// kiln build --ssh: key files go with the submission; the agent's id
// only, and once submitted the build's ssh session serves the agent
// read-only, answering for the forwarded ids alone.
func TestBuildSSHForwardsTheAgentAndSendsKeyFiles(t *testing.T) {
	ag := testkit.StartSSHAgent(t, t.TempDir())
	t.Setenv("SSH_AUTH_SOCK", ag.Socket)
	keyFile := testkit.NewSSHKey(t, t.TempDir(), "deploy")
	s := newFakeServer(t)
	s.events = eventScript(1, nil) // the build runs until the test ends it
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	seen := make(chan sshSeen, 1)
	s.handle("GET /v1/builds/b1/ssh", func(w http.ResponseWriter, r *http.Request) {
		out := sshSeen{upgrade: r.Header.Get("Upgrade")}
		defer func() { seen <- out; cancel() }()
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: kiln-ssh/1\r\n\r\n")
		brw.Flush()
		sess, err := sshrelay.Server(conn)
		if err != nil {
			t.Error(err)
			return
		}
		defer sess.Close()
		c, err := sess.Dial(r.Context(), "default")
		if err != nil {
			t.Errorf("dial default: %v", err)
			return
		}
		a := agent.NewClient(c)
		keys, err := a.List()
		if err != nil {
			t.Errorf("list: %v", err)
		}
		for _, k := range keys {
			out.keys = append(out.keys, ssh.FingerprintSHA256(k))
		}
		out.removeErr = a.RemoveAll()
		after, _ := a.List()
		out.keysAfterRm = len(after)
		c.Close()
		_, out.otherErr = sess.Dial(r.Context(), "deploy")
	})
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(ctx, "build", "--ssh", "default", "--ssh", "deploy="+keyFile.File, "--progress", "plain", dir)

	var got sshSeen
	select {
	case got = <-seen:
	case <-time.After(20 * time.Second):
		t.Fatalf("kiln build never opened the build's ssh session:\n%s", res)
	}
	if got.upgrade != sshrelay.Protocol {
		t.Errorf("Upgrade: %q", got.upgrade)
	}
	if len(got.keys) != 1 || got.keys[0] != ag.Key.Fingerprint {
		t.Errorf("the session listed %v, want the agent's %s", got.keys, ag.Key.Fingerprint)
	}
	if got.removeErr == nil || got.keysAfterRm != 1 {
		t.Errorf("the build could remove the user's keys: err %v, %d keys left", got.removeErr, got.keysAfterRm)
	}
	if got.otherErr == nil || !strings.Contains(got.otherErr.Error(), "forwards no ssh agent") {
		t.Errorf("a key-file id through the session: err = %v, want a refusal", got.otherErr)
	}

	up := s.upload(t, 0)
	if strings.Join(up.fields["ssh"], ",") != "default" {
		t.Errorf("ssh fields %v, want [default]", up.fields["ssh"])
	}
	if k := up.fields["ssh_key"]; len(k) != 1 || k[0] != string(keyFile.Private) {
		t.Errorf("the key file was not sent as one ssh_key part (%d parts)", len(k))
	}
	for name, vals := range up.fields {
		for _, v := range vals {
			if strings.Contains(v, ag.Socket) {
				t.Errorf("field %s carries the agent's socket path", name)
			}
		}
	}
	if strings.Contains(res.stdout+res.stderr, "PRIVATE KEY") {
		t.Errorf("the key was printed:\n%s", res)
	}
}

func TestBuildSSHUsageErrors(t *testing.T) {
	ag := testkit.StartSSHAgent(t, t.TempDir())
	enc := filepath.Join(t.TempDir(), "enc")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", enc).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	notKey := filepath.Join(t.TempDir(), "notkey")
	os.WriteFile(notKey, []byte("hello"), 0o600)
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	for _, tc := range []struct {
		name, sock string
		args       []string
		want       string
	}{
		{"no agent", "", []string{"--ssh", "default"}, "SSH_AUTH_SOCK, which is not set"},
		{"encrypted key", "", []string{"--ssh", "k=" + enc}, "passphrase"},
		{"not a key", "", []string{"--ssh", "k=" + notKey}, "not an unencrypted"},
		{"missing file", "", []string{"--ssh", "k=/nonexistent/key"}, "no such file"},
		{"bad id", ag.Socket, []string{"--ssh", "a/b"}, "use default or ID"},
		{"twice", ag.Socket, []string{"--ssh", "default", "--ssh", "default=" + ag.Socket}, "given twice"},
		{"detached", ag.Socket, []string{"--ssh", "default", "--detach"}, "--detach"},
		{"socket and key", "", []string{"--ssh", "x=" + ag.Socket + "," + ag.Key.File}, "not both"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("SSH_AUTH_SOCK", tc.sock)
			res := s.kiln(context.Background(), append(append([]string{"build"}, tc.args...), dir)...)
			if res.code != 2 || !strings.Contains(res.stderr, tc.want) {
				t.Errorf("want exit 2 saying %q:\n%s", tc.want, res)
			}
			if strings.Contains(res.stderr, "PRIVATE KEY") {
				t.Errorf("the error quotes a key:\n%s", res)
			}
		})
	}
	if reqs := s.seenRequests(); len(reqs) != 0 {
		t.Errorf("usage errors reached the server: %v", reqs)
	}
	// A dead agent socket is said at once too.
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "dead.sock"))
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	t.Setenv("SSH_AUTH_SOCK", dead)
	if res := s.kiln(context.Background(), "build", "--ssh", "default", dir); res.code != 2 || !strings.Contains(res.stderr, "does not answer") {
		t.Errorf("a dead agent: want exit 2 saying it does not answer:\n%s", res)
	}
}
