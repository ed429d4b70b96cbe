package guest

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/testkit"
)

// A job's ssh agents are dialed from the guest as tunnel streams and
// served on the host by the job's own SSHAgent: the guest's solve request
// has the ids and a dialer, never the keys; other ids, and other jobs,
// reach nothing.
func TestSSHAgentsAreDialedBackToTheHost(t *testing.T) {
	key := testkit.NewSSHKey(t, t.TempDir(), "guest-test-key")
	ring, err := sshrelay.Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	var asked atomic.Value
	c, s := connect(t, &Host{})
	job := testJob(t)
	job.Solve.SSH = []string{"deploy"}
	job.Solve.SSHAgent = func(ctx context.Context, id string) (net.Conn, error) {
		asked.Store(id)
		return sshrelay.AgentDialer(ring)(ctx)
	}
	done := run(context.Background(), c, job, nil)
	task, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	req := task.Job().Solve
	if len(req.SSH) != 1 || req.SSH[0] != "deploy" || req.SSHAgent == nil {
		t.Fatalf("the guest's request has ssh %v, dialer set %t; want [deploy] and a dialer", req.SSH, req.SSHAgent != nil)
	}
	if wire, _ := json.Marshal(task.Job()); strings.Contains(string(wire), "PRIVATE KEY") {
		t.Error("the key reached the guest")
	}

	conn, err := req.SSHAgent(context.Background(), "deploy")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := agent.NewClient(conn).List()
	conn.Close()
	if err != nil || len(keys) != 1 {
		t.Fatalf("list through the tunnel: %d keys, %v", len(keys), err)
	}
	if got, _ := asked.Load().(string); got != "deploy" {
		t.Errorf("the host dialed %q, want deploy", got)
	}
	if _, err := req.SSHAgent(context.Background(), "other"); err == nil || !strings.Contains(err.Error(), `no tunnel "ssh/other"`) {
		t.Errorf("an id the job does not name: err = %v", err)
	}
	ssh := req.SSHAgent
	task.Finish(solve.Result{}, nil)
	if r := wait(t, done, "Run"); r.err != nil {
		t.Fatal(r.err)
	}

	// The next job has no agents; the last job's dialer reaches nothing.
	done = run(context.Background(), c, testJob(t), nil)
	task2, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if task2.Job().Solve.SSHAgent != nil {
		t.Error("a job without ssh agents got a dialer")
	}
	if _, err := ssh(context.Background(), "deploy"); err == nil {
		t.Error("an ended job's ssh agent was dialed during the next job")
	}
	task2.Finish(solve.Result{}, nil)
	if r := wait(t, done, "Run"); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestJobWithSSHButNoDialerIsRefused(t *testing.T) {
	c, _ := connect(t, &Host{})
	job := testJob(t)
	job.Solve.SSH = []string{"default"}
	if _, err := c.Run(context.Background(), job, nil); err == nil || !strings.Contains(err.Error(), "no SSHAgent") {
		t.Errorf("err = %v", err)
	}
}
