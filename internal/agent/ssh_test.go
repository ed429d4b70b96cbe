package agent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/testkit"
)

// A step's ssh mount inside the builder reaches the job's agent on the
// host: the agent's solve dials it back through the job's tunnel
// ("ssh/<id>"), so the key stays on the host; none of it lands on the
// cache volume.
func TestSSHMountReachesTheHostsAgent(t *testing.T) {
	f := newFixture(t)
	key := testkit.NewSSHKey(t, t.TempDir(), "agent-test-key")
	ring, err := sshrelay.Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY sshlist /sshlist\nRUN --mount=type=ssh,id=deploy,required=true [\"/sshlist\"]\n",
	})
	bin, err := os.ReadFile(testkit.SSHList(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sshlist"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	var dials atomic.Int32
	_, rec := runBuild(t, f, "ssh", solve.Request{
		ContextDir: dir,
		SSH:        []string{"deploy"},
		SSHAgent: func(ctx context.Context, id string) (net.Conn, error) {
			dials.Add(1)
			return sshrelay.AgentDialer(ring)(ctx)
		},
	})
	if dials.Load() == 0 {
		t.Error("the host's dialer was never asked")
	}
	if !strings.Contains(rec.Logs(), "signed "+key.Fingerprint) {
		t.Errorf("the step did not list and sign with the host's key:\n%s", rec.Logs())
	}
	assertReleased(t, f)
	lines := strings.Split(strings.TrimSpace(string(key.Private)), "\n")
	if found, err := testkit.FileContains(f.volume, []byte(lines[len(lines)/2])); err != nil {
		t.Fatal(err)
	} else if found {
		t.Error("the private key is on the cache volume")
	}
}
