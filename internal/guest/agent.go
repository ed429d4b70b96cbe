package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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

// Session is the agent's side of one connection to the host: the setup,
// then any number of jobs, one at a time, until the host releases the
// builder or goes away. Its methods are safe for concurrent use.
type Session struct {
	mux   *yamux.Session
	local *slog.Logger
	// ctx ends when the connection to the host is lost (cause ErrHostGone).
	ctx    context.Context
	cancel context.CancelCauseFunc

	control  net.Conn
	ctrlW    *frameWriter
	incoming chan incoming
	ctrlDone chan struct{} // closed when the control stream ended

	mu    sync.Mutex
	cur   *Task // the setup or job the host handed over last, until finished
	setup Setup
}

// incoming is the next thing the host handed over: a task, or the release.
type incoming struct {
	task    *Task
	release bool
}

// Task is the setup or one job: its events sink, its context download and
// its tunnels, all of which end with it. Its methods are safe for
// concurrent use.
type Task struct {
	s      *Session
	seq    int
	job    Job
	ctx    context.Context
	cancel context.CancelCauseFunc

	ack     chan struct{} // closed when the host acknowledged the result
	ackOnce sync.Once

	events    net.Conn
	eventsW   *frameWriter
	eventsMu  sync.Mutex
	eventsEnd bool
	eventsErr error

	brokenMu sync.Mutex
	broken   error

	finishOnce sync.Once
	taken      atomic.Bool // handed out by Setup or Next
}

var _ progress.Sink = (*Task)(nil)

// Accept says hello on conn (the guest end of the host channel), waits for
// the host to accept it and opens the control stream. It speaks first
// because a virtio-serial port drops what the host sends while the guest
// has the port closed. On success the Session owns conn; call Setup next.
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
	s := &Session{mux: mux, local: opt.Logger, incoming: make(chan incoming, 4), ctrlDone: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	err = untilDone(ctx, mux, func() (err error) {
		if s.control, err = s.open(kindControl, "", 0); err != nil {
			return fmt.Errorf("open control stream: %w", err)
		}
		return nil
	})
	if err != nil {
		s.cancel(err)
		mux.Close()
		return nil, err
	}
	s.ctrlW = &frameWriter{w: s.control}
	go s.readControl()
	go func() {
		<-mux.CloseChan()
		s.cancel(ErrHostGone)
	}()
	return s, nil
}

// open opens a stream of kind for task seq and waits for the host to
// accept it.
func (s *Session) open(kind, name string, seq int) (net.Conn, error) {
	stream, err := s.mux.Open()
	if err != nil {
		return nil, err
	}
	var reply streamReply
	err = writeLine(stream, streamHeader{Kind: kind, Name: name, Seq: seq})
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

// readControl follows the host's control messages for the whole session.
// A task is registered the moment its message arrives, so a cancel right
// behind it is not lost.
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
		case msgSetup, msgJob:
			t, err := s.newTask(m)
			if err != nil {
				s.local.Error("the host broke the protocol; ignoring its message", "type", m.Type, "seq", m.Seq, "err", err)
				continue
			}
			s.incoming <- incoming{task: t}
		case msgRelease:
			s.incoming <- incoming{release: true}
		case msgCancel:
			if t := s.current(); t != nil && t.seq == m.Seq {
				t.cancel(ErrCanceledByHost)
			}
		case msgAck:
			// The task ends here, not when Finish wakes up: the host may
			// send the next job right behind the ack.
			s.mu.Lock()
			if t := s.cur; t != nil && t.seq == m.Seq {
				t.ackOnce.Do(func() { close(t.ack) })
				s.cur = nil
			}
			s.mu.Unlock()
		default:
			s.local.Warn("the host sent an unknown control message; ignoring it", "type", m.Type)
		}
	}
}

func (s *Session) newTask(m hostMessage) (*Task, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil {
		return nil, fmt.Errorf("task %d is still running", s.cur.seq)
	}
	t := &Task{s: s, seq: m.Seq, ack: make(chan struct{})}
	switch {
	case m.Type == msgSetup && m.Seq == 0 && m.Setup != nil:
		s.setup = *m.Setup
	case m.Type == msgJob && m.Seq > 0 && m.Job != nil:
		t.job = *m.Job
		t.job.Solve = joinMemory(t.job.Solve, m.Memory)
		t.bindSSH()
	default:
		return nil, fmt.Errorf("malformed %s message", m.Type)
	}
	t.ctx, t.cancel = context.WithCancelCause(s.ctx)
	s.cur = t
	return t, nil
}

func (s *Session) current() *Task {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Setup waits for the host's setup, the first thing it sends. Report the
// setup's outcome with the Task's Finish, then take jobs with Next.
func (s *Session) Setup(ctx context.Context) (*Task, error) {
	t, err := s.next(ctx)
	if err != nil {
		return nil, fmt.Errorf("receive the builder setup: %w", err)
	}
	if t.seq != 0 {
		return nil, fmt.Errorf("the host sent job %d where the setup belongs", t.seq)
	}
	return t, nil
}

// Next waits for the host's next job. When the host releases the builder
// instead, the error wraps ErrReleased: tear down, then answer with
// Released. When the host went away it wraps ErrHostGone.
func (s *Session) Next(ctx context.Context) (*Task, error) {
	t, err := s.next(ctx)
	if err != nil {
		return nil, err
	}
	if t.seq == 0 {
		return nil, errors.New("the host sent a second setup")
	}
	return t, nil
}

func (s *Session) next(ctx context.Context) (*Task, error) {
	if t := s.current(); t != nil && t.taken.Load() {
		return nil, fmt.Errorf("task %d is not finished; Finish it first", t.seq)
	}
	var in incoming
	select {
	case in = <-s.incoming:
	case <-s.ctrlDone:
		// A message read before the control stream ended still counts.
		select {
		case in = <-s.incoming:
		default:
			return nil, ErrHostGone
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if in.release {
		return nil, ErrReleased
	}
	t := in.task
	t.taken.Store(true)
	events, err := s.open(kindEvents, "", t.seq)
	t.eventsMu.Lock()
	defer t.eventsMu.Unlock()
	if err != nil {
		// The host learns of the task's outcome through done; an events
		// stream that could not be opened only loses events.
		t.eventsErr = fmt.Errorf("open the events stream of task %d: %w", t.seq, err)
		s.local.Error("no events stream", "err", t.eventsErr)
		return t, nil
	}
	t.events, t.eventsW = events, &frameWriter{w: events}
	return t, nil
}

// Released answers the host's release with the outcome of the teardown
// (nil: buildkitd stopped, the volume released cleanly) and waits, briefly,
// for the host to hang up, so the VM is not powered off while the answer
// is still in flight.
func (s *Session) Released(teardown error) error {
	m := agentMessage{Type: msgReleased}
	if teardown != nil {
		m.Error = teardown.Error()
	}
	werr := s.ctrlW.write(m)
	select {
	case <-s.mux.CloseChan():
		return nil
	case <-time.After(ackTimeout):
		if werr != nil {
			return fmt.Errorf("answer the release: %w", werr)
		}
		return fmt.Errorf("answer the release: the host did not hang up within %s", ackTimeout)
	}
}

// Logger returns a logger whose records go to the host's log, as part of
// the task running at the time (tagged as coming from the guest), and to
// AgentOptions.Logger. Between tasks they go only to the latter.
func (s *Session) Logger() *slog.Logger {
	return slog.New(&hostHandler{s: s, local: s.local.Handler()})
}

// Context ends when the connection to the host is lost (cause
// ErrHostGone).
func (s *Session) Context() context.Context { return s.ctx }

// Close ends the session and the connection.
func (s *Session) Close() error {
	s.cancel(ErrHostGone)
	return s.mux.Close()
}

// Seq is the task's number in the session: 0 for the setup, then 1, 2, …
func (t *Task) Seq() int { return t.seq }

// Setup is the session's builder setup.
func (t *Task) Setup() Setup {
	t.s.mu.Lock()
	defer t.s.mu.Unlock()
	return t.s.setup
}

// Job returns the job, including its memory-only fields; zero for the
// setup.
func (t *Task) Job() Job { return t.job }

// Context ends when the host cancels the task (cause ErrCanceledByHost)
// or the connection to it is lost (cause ErrHostGone); see context.Cause.
func (t *Task) Context() context.Context { return t.ctx }

// Emit sends e to the host as the task's event. Events arrive in the order
// Emit was called. Once the events stream failed, events are dropped.
func (t *Task) Emit(e progress.Event) {
	t.sendEvent(eventFrame{Event: &e})
}

func (t *Task) sendEvent(f eventFrame) {
	t.eventsMu.Lock()
	defer t.eventsMu.Unlock()
	// Before its stream is open (a log record right as the task arrived)
	// there is nowhere to send to.
	if t.eventsEnd || t.eventsErr != nil || t.eventsW == nil {
		return
	}
	t.eventsErr = t.eventsW.write(f)
}

// MarkBroken records why the builder cannot take another job after this
// one (buildkitd exited, a cleanup failed); Finish tells the host.
func (t *Task) MarkBroken(why error) {
	t.brokenMu.Lock()
	defer t.brokenMu.Unlock()
	t.broken = errors.Join(t.broken, why)
}

// FetchContext downloads the job's build context (and its Dockerfile dir,
// when that is separate, and each named local context) below dir, which
// must exist, and returns the job's solve request with ContextDir,
// DockerfileDir and LocalContexts pointing there: dir/context,
// dir/dockerfile, dir/named/N.
func (t *Task) FetchContext(ctx context.Context, dir string) (solve.Request, error) {
	req := t.job.Solve
	fetch := func(name string) (string, error) {
		if !validTree(name) {
			return "", fmt.Errorf("fetch %q: the host named no context tree this agent knows (host and agent from different kilns?)", name)
		}
		target := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return "", fmt.Errorf("fetch %s: %w", name, err)
		}
		if err := os.Mkdir(target, 0o755); err != nil {
			return "", fmt.Errorf("fetch %s: %w", name, err)
		}
		stream, err := t.s.open(kindContext, name, t.seq)
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
	if len(t.job.Solve.LocalContexts) > 0 {
		// A map of its own: the job's stays as the host sent it.
		req.LocalContexts = make(map[string]string, len(t.job.Solve.LocalContexts))
		for _, name := range slices.Sorted(maps.Keys(t.job.Solve.LocalContexts)) {
			tree := t.job.Solve.LocalContexts[name]
			if !strings.HasPrefix(tree, treeNamed) {
				return req, fmt.Errorf("named local context %s: the host sent %q instead of a context tree name", name, tree)
			}
			if req.LocalContexts[name], err = fetch(tree); err != nil {
				return req, fmt.Errorf("named local context %s: %w", name, err)
			}
		}
	}
	return req, nil
}

// validTree reports whether name is a context tree name of this protocol
// version: context, dockerfile or named/N.
func validTree(name string) bool {
	switch name {
	case treeContext, treeDockerfile:
		return true
	}
	n, ok := strings.CutPrefix(name, treeNamed)
	if !ok || n == "" || len(n) > 6 {
		return false
	}
	for _, c := range n {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// OpenTunnel opens one connection through the job's tunnel named name;
// the host connects it to that tunnel's Dialer. The host closes it when
// the job ends.
func (t *Task) OpenTunnel(ctx context.Context, name string) (net.Conn, error) {
	var c net.Conn
	err := untilDone(ctx, t.s.mux, func() (err error) {
		c, err = t.s.open(kindTunnel, name, t.seq)
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
// Call stop before Finish: the tunnels are the job's.
func (t *Task) ListenTunnels(ctx context.Context) (stop func(), err error) {
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
	for _, tun := range t.job.Tunnels {
		l, err := net.Listen("tcp", tun.Listen)
		if err != nil {
			stop()
			return nil, fmt.Errorf("listen for tunnel %q on %s inside the guest: %w (the address must be an IP this guest owns, e.g. on 127.0.0.0/8)", tun.Name, tun.Listen, err)
		}
		listeners = append(listeners, l)
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.forward(tctx, l, tun.Name, &wg)
		}()
	}
	return stop, nil
}

func (t *Task) forward(ctx context.Context, l net.Listener, name string, wg *sync.WaitGroup) {
	log := t.s.Logger()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			upstream, err := t.OpenTunnel(ctx, name)
			if err != nil {
				log.Warn("tunnel connection failed", "tunnel", name, "err", err)
				c.Close()
				return
			}
			splice(ctx, c, upstream)
		}()
	}
}

// Finish reports the task's outcome to the host and waits (briefly) for
// the host to acknowledge it. It closes the events stream first: every
// event emitted before Finish reaches the host before the result. For the
// setup, a nil buildErr means the builder is ready for jobs.
func (t *Task) Finish(res solve.Result, buildErr error) error {
	var err error
	t.finishOnce.Do(func() { err = t.finish(res, buildErr) })
	return err
}

func (t *Task) finish(res solve.Result, buildErr error) error {
	defer func() {
		t.cancel(context.Canceled)
		t.s.mu.Lock()
		if t.s.cur == t {
			t.s.cur = nil
		}
		t.s.mu.Unlock()
	}()
	t.eventsMu.Lock()
	t.eventsEnd = true
	events := t.events
	t.eventsMu.Unlock()
	if events != nil {
		events.Close()
	}

	m := agentMessage{Type: msgDone, Seq: t.seq, Result: res}
	if buildErr != nil {
		m.Error = buildErr.Error()
		m.Canceled = errors.Is(context.Cause(t.ctx), ErrCanceledByHost)
	}
	t.brokenMu.Lock()
	if t.broken != nil {
		m.Broken = t.broken.Error()
	}
	t.brokenMu.Unlock()
	// A write can report failure although the frame went out: a fast host
	// acks and hangs up before yamux confirms the send. The ack decides.
	werr := t.s.ctrlW.write(m)
	select {
	case <-t.ack:
		return nil
	case <-t.s.ctrlDone:
		if werr != nil {
			return fmt.Errorf("send the result to the host: %w (%v)", ErrHostGone, werr)
		}
		return fmt.Errorf("send the result to the host: %w before it acknowledged", ErrHostGone)
	case <-time.After(ackTimeout):
		return fmt.Errorf("send the result to the host: no acknowledgement within %s", ackTimeout)
	}
}

// hostHandler is a slog.Handler that forwards records to the host over the
// running task's events stream and to a local handler.
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
	if t := h.s.current(); t != nil {
		t.sendEvent(eventFrame{Log: rec})
	}
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
