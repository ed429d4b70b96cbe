package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"mime/multipart"
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

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/testkit"
)

// openSSH opens build id's ssh session as tenant token and answers
// "default" from key, as kiln build --ssh does.
func openSSH(t *testing.T, k *kiln, token, id string, key testkit.SSHKey) {
	t.Helper()
	ring, err := sshrelay.Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", k.url+"/v1/builds/"+id+"/ssh", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", sshrelay.Protocol)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("open the ssh session: %d %s", resp.StatusCode, b)
	}
	conn := resp.Body.(io.ReadWriteCloser)
	t.Cleanup(func() { conn.Close() })
	go sshrelay.Serve(context.Background(), conn, func(string) (sshrelay.Handler, error) {
		return func(c net.Conn) { defer c.Close(); agent.ServeAgent(ring, c) }, nil
	})
}

// jobOf waits for the fake runtime to get build id's job.
func jobOf(t *testing.T, id string) runtime.Job {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if j, ok := jobs.Load(id); ok {
			return j.(runtime.Job)
		}
		if time.Now().After(deadline) {
			t.Fatalf("build %s never reached the runtime", id)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fingerprints(t *testing.T, job runtime.Job, id string) []string {
	t.Helper()
	conn, err := job.Solve.SSHAgent(context.Background(), id)
	if err != nil {
		t.Fatalf("dial ssh agent %s: %v", id, err)
	}
	defer conn.Close()
	keys, err := agent.NewClient(conn).List()
	if err != nil {
		t.Fatalf("list ssh agent %s: %v", id, err)
	}
	var out []string
	for _, k := range keys {
		out = append(out, ssh.FingerprintSHA256(k))
	}
	return out
}

// The ssh session over HTTP: the build waits for it, then its steps'
// agent connections reach the client through it; without Upgrade the
// route says how to ask.
func TestSSHSessionOverHTTPServesTheBuild(t *testing.T) {
	k := startKiln(t)
	tok := k.token("tenant-a", "build:write", "image:write")
	b := k.submitAs(tok, [2]string{"ssh", "default"}, [2]string{"build_args", `{"HOLD":"1"}`})
	if b.Ssh == nil || strings.Join(*b.Ssh, ",") != "default" {
		t.Errorf("the build's ssh field is %v, want [default]", b.Ssh)
	}
	code, body := k.call(tok, "GET", "/v1/builds/"+b.Id+"/ssh", nil, "")
	if code != http.StatusUpgradeRequired || !strings.Contains(string(body), "Upgrade: kiln-ssh/1") {
		t.Errorf("without Upgrade: %d %s, want 426 saying how", code, body)
	}
	key := testkit.NewSSHKey(t, t.TempDir(), "client")
	openSSH(t, k, tok, b.Id, key)
	if got := fingerprints(t, jobOf(t, b.Id), "default"); len(got) != 1 || got[0] != key.Fingerprint {
		t.Errorf("the build's agent listed %v, want %s", got, key.Fingerprint)
	}
	code, body = k.call(tok, "GET", "/v1/builds/"+b.Id+"/ssh", nil, "", [2]string{"Connection", "Upgrade"}, [2]string{"Upgrade", "kiln-ssh/1"})
	if code != http.StatusConflict {
		t.Errorf("a second session: %d %s, want 409", code, body)
	}
	k.json(tok, "POST", "/v1/builds/"+b.Id+"/cancel", nil, http.StatusOK, nil)
}

// Key files travel as ssh_key parts and are served from memory; an
// encrypted key is refused with the reason and without the key.
func TestSSHKeyPartsServeTheBuild(t *testing.T) {
	k := startKiln(t)
	tok := k.token("tenant-a", "build:write", "image:write")
	key := testkit.NewSSHKey(t, t.TempDir(), "deploy")
	submitKey := func(keyData []byte) (int, []byte) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		mw.WriteField("build_args", `{"HOLD":"1"}`)
		w, _ := mw.CreateFormFile("ssh_key", "deploy")
		w.Write(keyData)
		ctxPart, _ := mw.CreateFormFile("context", "context.tar")
		ctxPart.Write(scratchContext())
		mw.Close()
		return k.call(tok, "POST", "/v1/builds", &buf, mw.FormDataContentType())
	}
	code, resp := submitKey(key.Private)
	if code != http.StatusAccepted {
		t.Fatalf("submit with an ssh key: %d %s", code, resp)
	}
	var b api.Build
	json.Unmarshal(resp, &b)
	if got := fingerprints(t, jobOf(t, b.Id), "deploy"); len(got) != 1 || got[0] != key.Fingerprint {
		t.Errorf("the build's agent deploy listed %v, want %s", got, key.Fingerprint)
	}
	k.json(tok, "POST", "/v1/builds/"+b.Id+"/cancel", nil, http.StatusOK, nil)

	enc := filepath.Join(t.TempDir(), "enc")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", enc).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	data, _ := os.ReadFile(enc)
	code, resp = submitKey(data)
	if code != http.StatusBadRequest || !strings.Contains(string(resp), "passphrase") || strings.Contains(string(resp), "PRIVATE KEY") {
		t.Errorf("an encrypted key: %d %s, want a 400 about the passphrase", code, resp)
	}
}

// An API client that asks for ssh forwarding and never opens the session
// gets a failed build whose error says what to do.
func TestSSHWithoutASessionFailsClearly(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.BuildsSSHSessionWait = 300 * time.Millisecond })
	tok := k.token("tenant-a", "build:write", "image:write")
	b := k.submitAs(tok, [2]string{"ssh", "default"})
	b = k.awaitStatus(b.Id, api.BuildStatusFailed, api.BuildStatusSucceeded)
	if b.Status != api.BuildStatusFailed || b.Error == nil || !strings.Contains(*b.Error, "/v1/builds/"+b.Id+"/ssh") || !strings.Contains(*b.Error, "kiln build --ssh") {
		t.Errorf("build %s %s: %v, want it failed saying how to open the session", b.Id, b.Status, b.Error)
	}
}
