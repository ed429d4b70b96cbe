package builds

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/store"
	"golang.org/x/crypto/ssh/agent"
)

// SSH agents for RUN --mount=type=ssh (kiln build --ssh, as buildx has
// it). A build names agent ids; each is either forwarded from its
// client's ssh-agent, over the build's ssh session (AttachSSH), or served
// from key files the client sent with the submission, held in memory
// only like secrets and answered from an in-memory keyring. Either way
// the runtime gets ids and a dialer (solve.Request.SSH, SSHAgent), and no
// key or socket path is ever written down.

// SSHSession is the server's end of a build's ssh session
// (sshrelay.Session): the build's steps dial its client's agents on it.
type SSHSession interface {
	Dial(ctx context.Context, id string) (net.Conn, error)
	Done() <-chan struct{}
	Close() error
}

// DefaultSSHSessionWait is how long a build that forwards its client's
// ssh agent waits for the client's ssh session before it fails.
const DefaultSSHSessionWait = time.Minute

// sshWaitPhase is the phase of a build waiting for its client's session.
const sshWaitPhase = "waiting for the client's ssh session"

// validateSSH checks the request's agent ids and key files, records the
// ids in o and parses each id's key files, once, into the keyring the
// build is served from (req.sshRings). Its errors never quote a key.
func validateSSH(req *Request, o *store.BuildOptions) error {
	if n := len(req.SSH) + len(req.SSHKeys); n > sshrelay.MaxIDs {
		return badRequest("%d ssh agent ids; at most %d", n, sshrelay.MaxIDs)
	}
	keys := 0
	for id, files := range req.SSHKeys {
		if !sshrelay.ValidID(id) {
			return badRequest("ssh key id %s is invalid: use 1-128 letters, digits, '.', '_' or '-'", errdefs.Quote(id))
		}
		if len(files) == 0 {
			return badRequest("ssh key id %s has no key file", id)
		}
		ring, err := sshrelay.Keyring(files)
		if err != nil {
			return badRequest("ssh key %s: %v", id, err)
		}
		if req.sshRings == nil {
			req.sshRings = map[string]agent.Agent{}
		}
		req.sshRings[id] = ring
		keys += len(files)
		o.SSH = append(o.SSH, store.SSHAgent{ID: id, Keys: true})
	}
	if keys > sshrelay.MaxKeys {
		return badRequest("%d ssh key files; at most %d", keys, sshrelay.MaxKeys)
	}
	for _, id := range req.SSH {
		if !sshrelay.ValidID(id) {
			if strings.Contains(id, "=") {
				return badRequest("ssh %s: give the agent id only; the agent stays with the client, which serves it through GET /v1/builds/{id}/ssh, and key files go in ssh_key parts", errdefs.Quote(id))
			}
			return badRequest("ssh agent id %s is invalid: use 1-128 letters, digits, '.', '_' or '-'", errdefs.Quote(id))
		}
		if slices.ContainsFunc(o.SSH, func(a store.SSHAgent) bool { return a.ID == id }) {
			return badRequest("ssh agent id %s is given twice (or both as a forwarded agent and with key files); give each id once", id)
		}
		o.SSH = append(o.SSH, store.SSHAgent{ID: id})
	}
	slices.SortFunc(o.SSH, func(a, b store.SSHAgent) int { return strings.Compare(a.ID, b.ID) })
	return nil
}

// forwardsAgent says whether the build uses its client's ssh session.
func forwardsAgent(o store.BuildOptions) bool {
	return slices.ContainsFunc(o.SSH, func(a store.SSHAgent) bool { return !a.Keys })
}

// needsAttachment says whether the build cannot run without what it holds
// in memory only (its attachment).
func needsAttachment(o store.BuildOptions) bool {
	return len(o.SecretIDs) > 0 || len(o.RegistryAuthHosts) > 0 ||
		slices.ContainsFunc(o.SSH, func(a store.SSHAgent) bool { return a.Keys })
}

// heldInMemory says whether a build depends on something a server restart
// loses: its attachment, or its client's ssh session (whose client saw
// the server go away and does not come back for a rerun).
func heldInMemory(o store.BuildOptions) bool { return needsAttachment(o) || len(o.SSH) > 0 }

// sshAgents is what the build's solve gets: its ids, and a dialer that
// answers key-file ids from keyrings made here (in memory, for this run)
// and forwarded ids through the client's ssh session, as it is when the
// step dials.
func (s *Service) sshAgents(b Build, mem *attachment) ([]string, solve.SSHDialer, error) {
	if len(b.Options.SSH) == 0 {
		return nil, nil, nil
	}
	rings := map[string]sshrelay.Dialer{}
	for _, a := range b.Options.SSH {
		if !a.Keys {
			continue
		}
		if mem == nil || mem.sshRings[a.ID] == nil {
			return nil, nil, fmt.Errorf("the key files of ssh agent %s were held only in memory and are gone (the server restarted); submit the build again", a.ID)
		}
		rings[a.ID] = sshrelay.AgentDialer(mem.sshRings[a.ID])
	}
	build := b.ID
	return b.Options.SSHIDs(), func(ctx context.Context, id string) (net.Conn, error) {
		if dial, ok := rings[id]; ok {
			return dial(ctx)
		}
		sess := s.ssh.get(build)
		if sess == nil {
			return nil, fmt.Errorf("the client's ssh session is not open (it ended): ssh agent %q cannot be reached", id)
		}
		return sess.Dial(ctx, id)
	}, nil
}

// awaitSSH holds a build that forwards its client's ssh agent until the
// client's session is open: bounded (builds.ssh_session_wait), and
// before the build takes its scope or a slot, so the wait holds nothing
// up. ok is false when the build must not run: o is its end (empty when
// ctx ended).
func (s *Service) awaitSSH(ctx context.Context, b Build) (o store.Outcome, ok bool) {
	if !forwardsAgent(b.Options) {
		return o, true
	}
	attached := s.ssh.waitFor(b.ID)
	select {
	case <-attached:
		return o, true
	default:
	}
	wait := s.cfg.SSHSessionWait
	if wait <= 0 {
		wait = DefaultSSHSessionWait
	}
	s.phase(b.ID, sshWaitPhase)
	s.message(b.ID, "%s (ssh agents %s) for up to %s", sshWaitPhase, strings.Join(b.Options.SSHIDs(), ", "), wait)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-attached:
		s.phase(b.ID, "queued")
		return o, true
	case <-ctx.Done():
		return o, false
	case <-timer.C:
	}
	o.Status, o.Phase = store.StatusFailed, "failed"
	o.Error = fmt.Sprintf("the build forwards ssh agents (%s) from its client, but no client opened the build's ssh session within %s: build with kiln build --ssh, which opens it, or open GET /v1/builds/%s/ssh with Connection: Upgrade and Upgrade: %s right after submitting (see api/openapi.yaml)",
		strings.Join(b.Options.SSHIDs(), ", "), wait, b.ID, sshrelay.Protocol)
	return o, false
}

// AttachSSH serves build id's forwarded ssh agents through the session
// open returns (the client's upgraded connection), until the build ends,
// the session ends or ctx is done. Only the build's own tenant, with
// build:write, may: another tenant's build is not found, and an admin of
// another tenant is refused. open is called only once every check passed
// (an error after it is the session's, for the log: the client has no
// answer to read it in).
func (s *Service) AttachSSH(ctx context.Context, p auth.Principal, id string, open func() (SSHSession, error)) error {
	if !p.Has(auth.ScopeBuildWrite) {
		return forbidden("serving a build's ssh agents needs the build:write scope; ask for a token that has it")
	}
	b, err := s.Get(ctx, p, id)
	if err != nil {
		return err
	}
	switch {
	case b.Tenant != p.Tenant:
		return forbidden("only the tenant that submitted build %s may serve its ssh agents", id)
	case store.Terminal(b.Status):
		return errdefs.Conflict("build %s is %s; its ssh agents are no longer needed", id, b.Status)
	case !forwardsAgent(b.Options):
		return errdefs.Conflict("build %s forwards no ssh agent from its client (submit it with kiln build --ssh, or the API's ssh field); there is nothing for this session to serve", id)
	}
	release, err := s.ssh.reserve(id)
	if err != nil {
		return err
	}
	sess, err := open()
	if err != nil {
		release()
		return err
	}
	defer sess.Close()
	s.ssh.attach(id, sess)
	defer s.ssh.detach(id, sess)
	// The build may have ended between the check and the attach, after
	// its end closed what was attached then.
	if b, err := s.load(ctx, id); err != nil || store.Terminal(b.Status) {
		return err
	}
	s.message(id, "the client's ssh session is open: ssh agents %s are forwarded from it", strings.Join(forwardedIDs(b.Options), ", "))
	select {
	case <-sess.Done():
		if b, err := s.load(context.WithoutCancel(ctx), id); err == nil && !store.Terminal(b.Status) {
			s.message(id, "the client's ssh session ended before the build: steps that use its ssh agents fail from now on")
		}
	case <-ctx.Done():
	}
	return nil
}

func forwardedIDs(o store.BuildOptions) []string {
	var ids []string
	for _, a := range o.SSH {
		if !a.Keys {
			ids = append(ids, a.ID)
		}
	}
	return ids
}

// sshSessions holds the ssh session of each build on this server that has
// one open. The zero value is ready.
type sshSessions struct {
	mu sync.Mutex
	// cur maps a build id to its session; nil while one is being opened.
	cur map[string]SSHSession
	// attached maps a build id to a channel closed when a session
	// attaches, for the build waiting for one.
	attached map[string]chan struct{}
}

var errSSHSessionOpen = errdefs.Conflict("this build's ssh session is already open: one client serves a build's ssh agents")

// reserve claims build id's session slot while the session is opened;
// release gives it back if opening failed.
func (h *sshSessions) reserve(id string) (release func(), err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cur == nil {
		h.cur = map[string]SSHSession{}
	}
	if old, taken := h.cur[id]; taken {
		alive := old == nil
		if old != nil {
			select {
			case <-old.Done():
			default:
				alive = true
			}
		}
		if alive {
			return nil, errSSHSessionOpen
		}
	}
	h.cur[id] = nil
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if s, ok := h.cur[id]; ok && s == nil {
			delete(h.cur, id)
		}
	}, nil
}

func (h *sshSessions) attach(id string, sess SSHSession) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cur[id] = sess
	if c := h.attached[id]; c != nil {
		close(c)
		delete(h.attached, id)
	}
}

func (h *sshSessions) detach(id string, sess SSHSession) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cur[id] == sess {
		delete(h.cur, id)
	}
}

// get is build id's open session, or nil.
func (h *sshSessions) get(id string) SSHSession {
	h.mu.Lock()
	defer h.mu.Unlock()
	sess := h.cur[id]
	if sess == nil {
		return nil
	}
	select {
	case <-sess.Done():
		return nil
	default:
		return sess
	}
}

// waitFor returns a channel closed once build id has a session (at once
// if it has).
func (h *sshSessions) waitFor(id string) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if sess := h.cur[id]; sess != nil {
		select {
		case <-sess.Done():
		default:
			c := make(chan struct{})
			close(c)
			return c
		}
	}
	if h.attached == nil {
		h.attached = map[string]chan struct{}{}
	}
	c := h.attached[id]
	if c == nil {
		c = make(chan struct{})
		h.attached[id] = c
	}
	return c
}

// end closes build id's session, if any: the build has ended.
func (h *sshSessions) end(id string) {
	h.mu.Lock()
	sess := h.cur[id]
	delete(h.attached, id)
	h.mu.Unlock()
	if sess != nil {
		sess.Close()
	}
}

// closeAll ends every session: the server stops.
func (h *sshSessions) closeAll() {
	h.mu.Lock()
	var open []SSHSession
	for _, sess := range h.cur {
		if sess != nil {
			open = append(open, sess)
		}
	}
	h.mu.Unlock()
	for _, sess := range open {
		sess.Close()
	}
}
