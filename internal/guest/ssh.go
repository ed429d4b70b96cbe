package guest

import (
	"context"
	"net"
	"slices"
	"strings"
)

// SSH agents (solve.Request.SSH, RUN --mount=type=ssh) are served on the
// host, never in the guest: the agent's solve dials each agent connection
// as a tunnel stream named sshTunnel+id, and the host connects it with
// the job's own solve.Request.SSHAgent. So a job's key files and its
// client's agent stay on the host side; the guest sees ids only.
const sshTunnel = "ssh/"

// tunnelDialer is the host-side dialer of w's tunnel stream name: one of
// its job's ssh agents, or one of its Tunnels (Host.Tunnels). Nothing
// else: a job reaches only its own.
func (w *work) tunnelDialer(h *Host, name string) (Dialer, bool) {
	if id, ok := strings.CutPrefix(name, sshTunnel); ok {
		if w.job == nil || w.job.Solve.SSHAgent == nil || !slices.Contains(w.job.Solve.SSH, id) {
			return nil, false
		}
		dial := w.job.Solve.SSHAgent
		return func(ctx context.Context) (net.Conn, error) { return dial(ctx, id) }, true
	}
	d := h.Tunnels[name]
	return d, d != nil && w.hasTunnel(name)
}

// bindSSH points the job's solve at the host for its ssh agents.
func (t *Task) bindSSH() {
	if len(t.job.Solve.SSH) == 0 {
		return
	}
	t.job.Solve.SSHAgent = func(ctx context.Context, id string) (net.Conn, error) {
		return t.OpenTunnel(ctx, sshTunnel+id)
	}
}
