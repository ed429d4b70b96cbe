package solve

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/moby/buildkit/session/sshforward"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// SSHDialer opens one connection to the ssh-agent serving id, one of
// Request.SSH. The connection speaks the raw ssh-agent protocol; where
// the agent lives (the client's machine, at the end of its ssh session; a
// keyring in the server's memory; the host, from inside a builder VM) is
// the dialer's business.
type SSHDialer func(ctx context.Context, id string) (net.Conn, error)

// sshAgents serves RUN --mount=type=ssh: BuildKit asks the session
// whether an id is forwarded (CheckAgent) and opens one stream per agent
// connection a step makes (ForwardAgent), which this relays to a
// connection from the dialer. It replaces BuildKit's sshprovider, which
// can only reach sockets and key files on the machine it runs on.
type sshAgents struct {
	sshforward.UnimplementedSSHServer
	ids  []string
	dial SSHDialer
}

// newSSHAgents serves ids through dial. With no ids it still answers, so
// a step that needs an agent the build has none of is told how to give
// one.
func newSSHAgents(ids []string, dial SSHDialer) *sshAgents {
	return &sshAgents{ids: slices.Clone(ids), dial: dial}
}

func (a *sshAgents) Register(s *grpc.Server) { sshforward.RegisterSSHServer(s, a) }

func (a *sshAgents) check(id string) (string, error) {
	if id == "" {
		id = sshforward.DefaultID
	}
	if !slices.Contains(a.ids, id) || a.dial == nil {
		have := "none"
		if len(a.ids) > 0 {
			have = strings.Join(a.ids, ", ")
		}
		return id, status.Errorf(codes.NotFound, "no ssh agent %q was forwarded for this build (it has %s): build with kiln build --ssh %s (or, through the API, name it in the ssh field)", id, have, id)
	}
	return id, nil
}

func (a *sshAgents) CheckAgent(_ context.Context, req *sshforward.CheckAgentRequest) (*sshforward.CheckAgentResponse, error) {
	if _, err := a.check(req.ID); err != nil {
		return nil, err
	}
	return &sshforward.CheckAgentResponse{}, nil
}

func (a *sshAgents) ForwardAgent(stream sshforward.SSH_ForwardAgentServer) error {
	ctx := stream.Context()
	var id string
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(sshforward.KeySSHID); len(v) > 0 {
			id = v[0]
		}
	}
	id, err := a.check(id)
	if err != nil {
		return err
	}
	conn, err := a.dial(ctx, id)
	if err != nil {
		return status.Errorf(codes.Unavailable, "cannot reach ssh agent %q: %v", id, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	return relayAgent(stream, conn)
}

// relayAgent copies between a ForwardAgent stream and an agent
// connection. It returns as soon as the agent side ends, whatever the
// step does: returning ends the RPC, so the step's socket sees the end
// instead of waiting forever for an agent that is gone (BuildKit's own
// sshforward.Copy waits for both directions, and a vanished client would
// hang the step).
func relayAgent(stream sshforward.SSH_ForwardAgentServer, conn net.Conn) error {
	var stepDone atomic.Bool
	go func() {
		for {
			var m sshforward.BytesMessage
			if err := stream.RecvMsg(&m); err != nil {
				if errors.Is(err, io.EOF) {
					// The step finished sending; the agent may still
					// answer.
					stepDone.Store(true)
					if cw, ok := conn.(interface{ CloseWrite() error }); ok {
						cw.CloseWrite()
						return
					}
				}
				conn.Close()
				return
			}
			if _, err := conn.Write(m.Data); err != nil {
				conn.Close()
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if serr := stream.SendMsg(&sshforward.BytesMessage{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF), stepDone.Load():
			// A connection without half-close was closed after the
			// step's end: that is its end too.
			return nil
		default:
			return status.Errorf(codes.Unavailable, "ssh agent connection lost: %v", err)
		}
	}
}
