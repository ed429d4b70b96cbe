package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// AgentOptions configures the agent side of a connection.
type AgentOptions struct {
	// Agent names the agent and its version in the hello; the host logs it.
	Agent string
	// Logger receives the agent's local log output (the VM console); records
	// logged through Session.Logger go there and to the host.
	Logger *slog.Logger
}

// Session is the agent's side of one build: the job, the events sink, the
// context download and the tunnels. Its methods are safe for concurrent use.
type Session struct {
	mux    *yamux.Session
	job    Job
	local  *slog.Logger
	ctx    context.Context
	cancel context.CancelCauseFunc

	control  net.Conn
	ctrlW    *frameWriter
	ack      chan struct{} // closed when the host acknowledged the result
	ctrlDone chan struct{} // closed when the control stream ended without an ack

	events    net.Conn
	eventsW   *frameWriter
	eventsMu  sync.Mutex
	eventsEnd bool
	eventsErr error

	finishOnce sync.Once
}

var _ progress.Sink = (*Session)(nil)

// Accept says hello on conn (the guest end of the host channel), waits for
// the host to accept it and receives the job. It speaks first because a
// virtio-serial port drops what the host sends while the guest has the
// port closed. On success the Session owns conn.
func Accept(ctx context.Context, conn io.ReadWriteCloser, opt AgentOptions) (*Session, error) {
	return accept(ctx, conn, opt, Version)
}

func accept(ctx context.Context, conn io.ReadWriteCloser, opt AgentOptions, version int) (*Session, error) {
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	var reply helloReply
	err := untilDone(ctx, conn, func() error {
		if err := writeLine(conn, hello{Proto: protoName, Version: version, Agent: opt.Agent}); err != nil {
			return fmt.Errorf("say hello to the host: %w", err)
		}
		if err := readJSONLine(conn, &reply); err != nil {
			return fmt.Errorf("read the host's answer to hello: %w", err)
		}
		return nil
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	if reply.Error != "" {
		conn.Close()
		err := fmt.Errorf("host refused the agent: %s", reply.Error)
		if reply.Version != version {
			err = fmt.Errorf("%w: %w", ErrVersionMismatch, err)
		}
		return nil, err
	}
	if reply.Version != version {
		conn.Close()
		return nil, fmt.Errorf("%w: host answered with protocol version %d, agent speaks %d", ErrVersionMismatch, reply.Version, version)
	}

	mux, err := yamux.Client(conn, muxConfig(&muxLogger{log: opt.Logger}))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start host multiplexer: %w", err)
	}
	s := &Session{mux: mux, local: opt.Logger, ack: make(chan struct{}), ctrlDone: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	fail := func(err error) (*Session, error) {
		s.cancel(err)
		mux.Close()
		return nil, err
	}
	err = untilDone(ctx, mux, func() (err error) {
		if s.control, err = s.open(kindControl, ""); err != nil {
			return fmt.Errorf("open control stream: %w", err)
		}
		var m hostMessage
		if err := newFrameReader(s.control).read(&m); err != nil {
			return fmt.Errorf("receive job: %w", err)
		}
		if m.Type != msgJob || m.Job == nil {
			return fmt.Errorf("host sent %q where the job belongs", m.Type)
		}
		s.job = *m.Job
		s.job.Solve = joinMemory(s.job.Solve, m.Memory)
		if s.events, err = s.open(kindEvents, ""); err != nil {
			return fmt.Errorf("open events stream: %w", err)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	s.ctrlW = &frameWriter{w: s.control}
	s.eventsW = &frameWriter{w: s.events}
	go s.readControl()
	go func() {
		<-mux.CloseChan()
		s.cancel(ErrHostGone)
	}()
	return s, nil
}

// open opens a stream of kind and waits for the host to accept it.
func (s *Session) open(kind, name string) (net.Conn, error) {
	stream, err := s.mux.Open()
	if err != nil {
		return nil, err
	}
	var reply streamReply
	err = writeLine(stream, streamHeader{Kind: kind, Name: name})
	if err == nil {
		err = readJSONLine(stream, &reply)
	}
	if err == nil && reply.Error != "" {
		err = errors.New(reply.Error)
	}
	if err != nil {
		stream.Close()
		return nil, err
	}
	return stream, nil
}

// readControl follows the host's control messages after the job.
func (s *Session) readControl() {
	fr := newFrameReader(s.control)
	for {
		var m hostMessage
		if err := fr.read(&m); err != nil {
			s.cancel(ErrHostGone)
			close(s.ctrlDone)
			return
		}
		switch m.Type {
		case msgCancel:
			s.cancel(ErrCanceledByHost)
		case msgAck:
			close(s.ack)
			return
		}
	}
}

// Job returns the job, including its memory-only fields.
func (s *Session) Job() Job { return s.job }

// Context ends when the host cancels the build (cause ErrCanceledByHost)
// or the connection to it is lost (cause ErrHostGone); see context.Cause.
func (s *Session) Context() context.Context { return s.ctx }

// Emit sends e to the host. Events arrive in the order Emit was called.
// Once the connection failed, events are dropped: the host is gone.
func (s *Session) Emit(e progress.Event) {
	s.sendEvent(eventFrame{Event: &e})
}

func (s *Session) sendEvent(f eventFrame) {
	s.eventsMu.Lock()
	defer s.eventsMu.Unlock()
	if s.eventsEnd || s.eventsErr != nil {
		return
	}
	s.eventsErr = s.eventsW.write(f)
}

// Logger returns a logger whose records go to the host's log (tagged as
// coming from the guest) and to AgentOptions.Logger.
func (s *Session) Logger() *slog.Logger {
	return slog.New(&hostHandler{s: s, local: s.local.Handler()})
}

// FetchContext downloads the job's build context (and its Dockerfile dir,
// when that is separate) below dir, which must exist, and returns the
// job's solve request with ContextDir and DockerfileDir pointing there.
func (s *Session) FetchContext(ctx context.Context, dir string) (solve.Request, error) {
	req := s.job.Solve
	fetch := func(name string) (string, error) {
		target := filepath.Join(dir, name)
		if err := os.Mkdir(target, 0o755); err != nil {
			return "", fmt.Errorf("fetch %s: %w", name, err)
		}
		stream, err := s.open(kindContext, name)
		if err != nil {
			return "", fmt.Errorf("fetch %s from the host: %w", name, err)
		}
		defer stream.Close()
		if err := untilDone(ctx, stream, func() error { return receiveTreeChunked(stream, target) }); err != nil {
			return "", fmt.Errorf("fetch %s from the host: %w", name, err)
		}
		return target, nil
	}
	var err error
	if req.ContextDir, err = fetch(treeContext); err != nil {
		return req, err
	}
	if req.DockerfileDir != "" {
		if req.DockerfileDir, err = fetch(treeDockerfile); err != nil {
			return req, err
		}
	}
	return req, nil
}

// OpenTunnel opens one connection through the tunnel named name; the host
// connects it to that tunnel's Dialer.
func (s *Session) OpenTunnel(ctx context.Context, name string) (net.Conn, error) {
	var c net.Conn
	err := untilDone(ctx, s.mux, func() (err error) {
		c, err = s.open(kindTunnel, name)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open tunnel %q to the host: %w", name, err)
	}
	return c, nil
}

// ListenTunnels listens on every Job.Tunnels address inside the guest and
// forwards each accepted connection through its tunnel, until the returned
// stop is called; stop closes the listeners and every forwarded connection.
func (s *Session) ListenTunnels(ctx context.Context) (stop func(), err error) {
	tctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var listeners []net.Listener
	stop = func() {
		cancel()
		for _, l := range listeners {
			l.Close()
		}
		wg.Wait()
	}
	for _, t := range s.job.Tunnels {
		l, err := net.Listen("tcp", t.Listen)
		if err != nil {
			stop()
			return nil, fmt.Errorf("listen for tunnel %q on %s inside the guest: %w (the address must be an IP this guest owns, e.g. on 127.0.0.0/8)", t.Name, t.Listen, err)
		}
		listeners = append(listeners, l)
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.forward(tctx, l, t.Name, &wg)
		}()
	}
	return stop, nil
}

func (s *Session) forward(ctx context.Context, l net.Listener, name string, wg *sync.WaitGroup) {
	log := s.Logger()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			upstream, err := s.OpenTunnel(ctx, name)
			if err != nil {
				log.Warn("tunnel connection failed", "tunnel", name, "err", err)
				c.Close()
				return
			}
			splice(ctx, c, upstream)
		}()
	}
}

// Finish reports the build's outcome to the host and waits (briefly) for
// the host to acknowledge it, so the VM is not powered off while the result
// is still in flight. It closes the events stream first: every event
// emitted before Finish reaches the host before the result.
func (s *Session) Finish(res solve.Result, buildErr error) error {
	var err error
	s.finishOnce.Do(func() { err = s.finish(res, buildErr) })
	return err
}

func (s *Session) finish(res solve.Result, buildErr error) error {
	s.eventsMu.Lock()
	s.eventsEnd = true
	s.eventsMu.Unlock()
	s.events.Close()

	m := agentMessage{Type: msgDone, Result: res}
	if buildErr != nil {
		m.Error = buildErr.Error()
		m.Canceled = errors.Is(context.Cause(s.ctx), ErrCanceledByHost)
	}
	// A write can report failure although the frame went out: a fast host
	// acks and hangs up before yamux confirms the send. The ack decides.
	werr := s.ctrlW.write(m)
	select {
	case <-s.ack:
		return nil
	case <-s.ctrlDone:
		if werr != nil {
			return fmt.Errorf("send the result to the host: %w (%v)", ErrHostGone, werr)
		}
		return fmt.Errorf("send the result to the host: %w before it acknowledged", ErrHostGone)
	case <-time.After(ackTimeout):
		return fmt.Errorf("send the result to the host: no acknowledgement within %s", ackTimeout)
	}
}

// Close ends the session and the connection.
func (s *Session) Close() error {
	s.cancel(ErrHostGone)
	return s.mux.Close()
}

// hostHandler is a slog.Handler that forwards records to the host over the
// events stream and to a local handler.
type hostHandler struct {
	s      *Session
	local  slog.Handler
	attrs  []string
	prefix string
}

func (h *hostHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.local.Enabled(ctx, l)
}

func (h *hostHandler) Handle(ctx context.Context, r slog.Record) error {
	if h.local.Enabled(ctx, r.Level) {
		_ = h.local.Handle(ctx, r)
	}
	if r.Level < slog.LevelInfo {
		return nil
	}
	rec := &logRecord{Time: r.Time, Level: r.Level.String(), Msg: r.Message, Attrs: append([]string(nil), h.attrs...)}
	r.Attrs(func(a slog.Attr) bool {
		rec.Attrs = appendAttr(rec.Attrs, h.prefix, a)
		return true
	})
	h.s.sendEvent(eventFrame{Log: rec})
	return nil
}

func (h *hostHandler) WithAttrs(as []slog.Attr) slog.Handler {
	n := *h
	n.local = h.local.WithAttrs(as)
	n.attrs = append([]string(nil), h.attrs...)
	for _, a := range as {
		n.attrs = appendAttr(n.attrs, h.prefix, a)
	}
	return &n
}

func (h *hostHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	n := *h
	n.local = h.local.WithGroup(name)
	n.prefix = h.prefix + name + "."
	return &n
}

func appendAttr(dst []string, prefix string, a slog.Attr) []string {
	a.Value = a.Value.Resolve()
	if a.Value.Kind() == slog.KindGroup {
		for _, g := range a.Value.Group() {
			dst = appendAttr(dst, prefix+a.Key+".", g)
		}
		return dst
	}
	if a.Key == "" {
		return dst
	}
	return append(dst, prefix+a.Key, a.Value.String())
}
