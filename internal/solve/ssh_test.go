package solve_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/testkit"
)

// A RUN --mount=type=ssh step reaches the agent through Request.SSHAgent,
// asked for the id the mount names: it lists the key and signs with it.
func TestSSHMountReachesTheAgentThroughTheDialer(t *testing.T) {
	key := testkit.NewSSHKey(t, t.TempDir(), "solve-test-key")
	ring, err := sshrelay.Keyring([][]byte{key.Private})
	if err != nil {
		t.Fatal(err)
	}
	var asked atomic.Value
	rec := &testkit.Recorder{}
	_, err = solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: testkit.SSHListContext(t, ",id=deploy,required=true"),
		NoCache:    true,
		SSH:        []string{"deploy"},
		SSHAgent: func(ctx context.Context, id string) (net.Conn, error) {
			asked.Store(id)
			return sshrelay.AgentDialer(ring)(ctx)
		},
	}, rec)
	if err != nil {
		t.Fatalf("build: %v\nlogs:\n%s", err, rec.Logs())
	}
	if got, _ := asked.Load().(string); got != "deploy" {
		t.Errorf("the dialer was asked for %q, want deploy", got)
	}
	for _, want := range []string{"key " + key.Fingerprint, "signed " + key.Fingerprint} {
		if !strings.Contains(rec.Logs(), want) {
			t.Errorf("the step's output lacks %q:\n%s", want, rec.Logs())
		}
	}
}

// A required ssh mount of a build without that agent fails with a message
// that says how to forward one.
func TestSSHMountWithoutTheAgentSaysHowToForwardIt(t *testing.T) {
	_, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: testkit.SSHListContext(t, ",required=true"),
		NoCache:    true,
	}, nil)
	if err == nil || !strings.Contains(err.Error(), `no ssh agent "default" was forwarded`) || !strings.Contains(err.Error(), "--ssh default") {
		t.Fatalf("err = %v, want one saying to add --ssh default", err)
	}
}

// An agent that goes away under a step (the client's session dropped)
// fails the step promptly: the build does not hang on it.
func TestSSHAgentLostMidStepFailsTheStep(t *testing.T) {
	dials := make(chan struct{}, 16)
	start := time.Now()
	_, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: testkit.SSHListContext(t, ",required=true"),
		NoCache:    true,
		SSH:        []string{"default"},
		SSHAgent: func(ctx context.Context, id string) (net.Conn, error) {
			dials <- struct{}{}
			ours, theirs := net.Pipe()
			go func() {
				// Read the step's request, then vanish without an answer.
				buf := make([]byte, 512)
				ours.Read(buf)
				ours.Close()
			}()
			return theirs, nil
		},
	}, nil)
	if err == nil {
		t.Fatal("the build succeeded with an agent that vanished")
	}
	if len(dials) == 0 {
		t.Fatalf("the step never dialed the agent: %v", err)
	}
	if !strings.Contains(err.Error(), "sshlist") {
		t.Errorf("err = %v, want the step's own failure", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("the build took %s to fail after its agent vanished", d)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("the build hung until its deadline: %v", err)
	}
}
