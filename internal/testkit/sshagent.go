package testkit

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// SSHList returns a static build of ./internal/testkit/sshlist, which a
// build step runs in place of ssh-add -l: it lists the keys of the agent
// at $SSH_AUTH_SOCK ("key SHA256:… comment") and signs with each
// ("signed SHA256:…"). Put it in a build context and run it from a FROM
// scratch or busybox image. It is built once per test binary into
// <repo>/bin/sshlist ($KILN_SSHLIST if set), as it is kiln's own source.
func SSHList(t testing.TB) string { t.Helper(); return sshListTool.path(t) }

var sshListTool = &goToolOnce{env: "KILN_SSHLIST", name: "sshlist", pkg: "./internal/testkit/sshlist",
	stale: func(string, string) bool { return true }, buildEnv: []string{"CGO_ENABLED=0"}}

// SSHKey is a generated, unencrypted ed25519 key pair.
type SSHKey struct {
	// File is the private key file; Private its content.
	File    string
	Private []byte
	// Fingerprint is the public key's SHA256 fingerprint, as ssh-add -l
	// and sshlist print it.
	Fingerprint string
}

// NewSSHKey generates a key pair with ssh-keygen into dir (comment names
// it in listings).
func NewSSHKey(t testing.TB, dir, comment string) SSHKey {
	t.Helper()
	file := filepath.Join(dir, comment)
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", file).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen (Debian's openssh-client): %v: %s", err, out)
	}
	priv, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := os.ReadFile(file + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	pk, _, _, _, err := ssh.ParseAuthorizedKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return SSHKey{File: file, Private: priv, Fingerprint: ssh.FingerprintSHA256(pk)}
}

// SSHAgent is a throwaway ssh-agent holding one generated key; it is
// killed when the test ends.
type SSHAgent struct {
	Socket string
	Key    SSHKey
}

// StartSSHAgent starts ssh-agent on a fresh socket and ssh-adds a new
// key (its files in keyDir).
func StartSSHAgent(t testing.TB, keyDir string) *SSHAgent {
	t.Helper()
	// Short: a unix socket path has at most 107 bytes.
	dir, err := os.MkdirTemp("", "kssh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command("ssh-agent", "-D", "-a", sock)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start ssh-agent (Debian's openssh-client): %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh-agent made no socket in 10s: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	key := NewSSHKey(t, keyDir, "kiln-test-agent-key")
	add := exec.Command("ssh-add", key.File)
	add.Env = append(os.Environ(), "SSH_AUTH_SOCK="+sock)
	if o, err := add.CombinedOutput(); err != nil {
		t.Fatalf("ssh-add: %v: %s", err, o)
	}
	return &SSHAgent{Socket: sock, Key: key}
}

// SSHListContext is a FROM scratch build context whose one step runs
// SSHList with RUN --mount=type=ssh<mount> (mount: ",id=deploy,required=true").
func SSHListContext(t testing.TB, mount string) string {
	t.Helper()
	dir := ContextDir(t, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY sshlist /sshlist\nRUN --mount=type=ssh" + mount + " [\"/sshlist\"]\n",
	})
	if err := copyFile(SSHList(t), filepath.Join(dir, "sshlist"), 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
