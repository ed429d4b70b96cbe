package sshrelay

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/testkit"
)

// session connects a server end and a client end that answers id
// "default" from a keyring of one generated key.
func session(t *testing.T) (*Session, testkit.SSHKey, net.Conn, <-chan error) {
	t.Helper()
	key := testkit.NewSSHKey(t, t.TempDir(), "relay-test-key")
	ring, err := Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	srvEnd, cliEnd := net.Pipe()
	sess, err := Server(srvEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	served := make(chan error, 1)
	go func() {
		served <- Serve(context.Background(), cliEnd, func(id string) (Handler, error) {
			if id != "default" {
				return nil, errors.New("this client forwards default only")
			}
			return func(stream net.Conn) {
				defer stream.Close()
				agent.ServeAgent(ring, stream)
			}, nil
		})
	}()
	return sess, key, cliEnd, served
}

func TestDialReachesTheClientsAgentReadOnly(t *testing.T) {
	sess, _, _, served := session(t)
	conn, err := sess.Dial(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	a := agent.NewClient(conn)
	keys, err := a.List()
	if err != nil || len(keys) != 1 {
		t.Fatalf("list: %d keys, %v", len(keys), err)
	}
	if got := keys[0].String(); got == "" {
		t.Error("empty key")
	}
	if _, err := a.Sign(keys[0], []byte("data")); err != nil {
		t.Errorf("sign through the relay: %v", err)
	}
	if err := a.RemoveAll(); err == nil {
		t.Error("a build could remove the keys of the agent it was lent")
	}
	if err := a.Lock([]byte("x")); err == nil {
		t.Error("a build could lock the agent it was lent")
	}
	if keys, _ := a.List(); len(keys) != 1 {
		t.Errorf("the agent has %d keys after a refused removal", len(keys))
	}
	conn.Close()

	if _, err := sess.Dial(context.Background(), "other"); err == nil || !strings.Contains(err.Error(), "forwards default only") {
		t.Errorf("unknown id: err = %v, want the client's refusal", err)
	}

	sess.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("the client's end returned %v when the server closed the session", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the client's end did not notice the server closed the session")
	}
	if _, err := sess.Dial(context.Background(), "default"); !errors.Is(err, ErrClosed) {
		t.Errorf("dial on a closed session: %v, want ErrClosed", err)
	}
}

// The client going away ends the session at once: an agent connection in
// use fails instead of hanging, and later dials say the session ended.
func TestClientGoneFailsOpenConnectionsAndDials(t *testing.T) {
	sess, _, cliEnd, _ := session(t)
	conn, err := sess.Dial(context.Background(), "default")
	if err != nil {
		t.Fatal(err)
	}
	cliEnd.Close()
	select {
	case <-sess.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end when the client's connection closed")
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("an open agent connection: read err = %v, want it ended", err)
	}
	if _, err := sess.Dial(context.Background(), "default"); !errors.Is(err, ErrClosed) {
		t.Errorf("dial after the client went away: %v, want ErrClosed", err)
	}
}

func TestDialHonoursItsContext(t *testing.T) {
	srvEnd, cliEnd := net.Pipe()
	defer cliEnd.Close()
	sess, err := Server(srvEnd)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	// A client that runs yamux but never answers a header.
	go Serve(context.Background(), cliEnd, func(string) (Handler, error) {
		select {}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := sess.Dial(ctx, "default"); err == nil {
		t.Fatal("dial answered by nobody succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("dial took %s with a 200ms context", d)
	}
}

func TestParseKeySaysWhatIsWrongWithoutQuotingTheKey(t *testing.T) {
	dir := t.TempDir()
	enc := filepath.Join(dir, "enc")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", enc).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	data, err := os.ReadFile(enc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseKey(data); !errors.Is(err, ErrEncryptedKey) {
		t.Errorf("encrypted key: err = %v, want ErrEncryptedKey", err)
	}
	junk := []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWp1bmstdGhhdC1pcy1ub3QtYS1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n")
	_, err = ParseKey(junk)
	if err == nil {
		t.Fatal("junk parsed as a key")
	}
	if strings.Contains(err.Error(), "c2VjcmV0") {
		t.Errorf("the error quotes the file: %v", err)
	}
	good := testkit.NewSSHKey(t, dir, "good")
	if _, err := ParseKey(good.Private); err != nil {
		t.Errorf("a fresh key: %v", err)
	}
}

func TestValidID(t *testing.T) {
	for id, want := range map[string]bool{"default": true, "git.hub_1-x": true, "": false, "a/b": false, "a=b": false, strings.Repeat("x", 129): false} {
		if ValidID(id) != want {
			t.Errorf("ValidID(%q) = %t", id, !want)
		}
	}
}
