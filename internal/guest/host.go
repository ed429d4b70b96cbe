package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// Host is the host side of the protocol: it hands one Job to the agent on
// the other end of a connection, relays the agent's events, serves its
// context downloads and tunnels, and returns the agent's result.
type Host struct {
	// Tunnels maps each Job.Tunnels name to the dialer that serves it.
	Tunnels map[string]Dialer
	// HelloTimeout bounds the wait for the agent's hello, i.e. for the VM
	// to boot and the agent to start (default 2 minutes).
	HelloTimeout time.Duration
	// CancelGrace bounds the wait, after ctx ended, for the agent to
	// confirm it stopped the build and released the volume (default 30s).
	CancelGrace time.Duration
	// Unresponsive is how long the agent may leave the host's pings
	// unanswered before Serve gives up on it with ErrAgentUnresponsive
	// (default 60s). A dead VM is noticed at once (its channel closes); a
	// frozen one keeps the channel open and is only noticed this way.
	Unresponsive time.Duration
	// Logger receives the agent's log records and the host side's own.
	Logger *slog.Logger
}

// Serve runs job on the agent at the other end of conn and returns its
// result. conn is typically the host end of a virtio-serial port; Serve
// reads first and sends nothing until the agent said hello, and it closes
// conn before returning.
//
// Events reach sink in the order the agent emitted them, and never after
// Serve returned. When ctx ends Serve asks the agent to cancel, waits up to
// CancelGrace for it to confirm, and returns an error wrapping ctx.Err().
// When the connection ends before the agent answered it returns an error
// wrapping ErrAgentGone.
func (h *Host) Serve(ctx context.Context, conn io.ReadWriteCloser, job Job, sink progress.Sink) (res solve.Result, err error) {
	defer conn.Close()
	if sink == nil {
		sink = progress.Discard
	}
	log := h.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("build", job.BuildID)
	wire, memory, err := h.prepare(job)
	if err != nil {
		return res, err
	}

	agent, err := h.handshake(ctx, conn)
	if err != nil {
		return res, err
	}
	log.Debug("guest agent connected", "agent", agent)

	muxLog := &muxLogger{log: log}
	mux, err := yamux.Server(conn, muxConfig(muxLog))
	if err != nil {
		return res, fmt.Errorf("start guest multiplexer: %w", err)
	}
	// serveCtx ends every stream handler when Serve returns.
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	s := &hostSession{
		h:         h,
		job:       job,
		log:       log,
		sink:      sink,
		mux:       mux,
		muxLog:    muxLog,
		ctx:       serveCtx,
		control:   make(chan net.Conn, 1),
		tunnels:   make(chan struct{}, maxTunnels),
		eventsEnd: make(chan struct{}),
	}
	defer func() {
		stop()
		mux.Close()
		s.wg.Wait()
		s.stopSink()
	}()
	s.wg.Add(2)
	go s.acceptLoop()
	go s.watch(h.unresponsive())

	var control net.Conn
	select {
	case control = <-s.control:
	case <-mux.CloseChan():
		if s.frozen.Load() {
			return res, s.goneErr(yamux.ErrSessionShutdown)
		}
		return res, fmt.Errorf("%w: the connection closed before the agent opened its control stream", ErrAgentGone)
	case <-ctx.Done():
		return res, fmt.Errorf("build canceled: %w", ctx.Err())
	case <-time.After(h.helloTimeout()):
		return res, fmt.Errorf("guest agent said hello but did not open its control stream within %s", h.helloTimeout())
	}
	if err := writeLine(control, hostMessage{Type: msgJob, Job: &wire, Memory: memory}); err != nil {
		return res, fmt.Errorf("%w: send job: %v", ErrAgentGone, err)
	}

	done := make(chan agentMessage, 1)
	readErr := make(chan error, 1)
	go func() {
		var m agentMessage
		fr := newFrameReader(control)
		for {
			if err := fr.read(&m); err != nil {
				readErr <- err
				return
			}
			if m.Type == msgDone {
				done <- m
				return
			}
			log.Warn("guest agent sent an unknown control message; ignoring it", "type", m.Type)
		}
	}()
	cw := &frameWriter{w: control}

	var m agentMessage
	select {
	case m = <-done:
	case err := <-readErr:
		return res, s.goneErr(err)
	case <-ctx.Done():
		if err := cw.write(hostMessage{Type: msgCancel}); err != nil {
			return res, fmt.Errorf("build canceled: %w (the agent could not be told: %v)", ctx.Err(), err)
		}
		grace := h.CancelGrace
		if grace == 0 {
			grace = 30 * time.Second
		}
		select {
		case m = <-done:
		case err := <-readErr:
			return res, fmt.Errorf("build canceled: %w (the agent went away before confirming: %v)", ctx.Err(), err)
		case <-time.After(grace):
			return res, fmt.Errorf("build canceled: %w (the agent did not confirm within %s that it stopped)", ctx.Err(), grace)
		}
	}

	// The agent closes its events stream before it sends its result, so
	// every event it emitted is already on its way.
	select {
	case <-s.eventsEnd:
	case <-time.After(eventsDrain):
		log.Warn("guest agent's events stream did not end after its result; later events are dropped")
	}
	if err := cw.write(hostMessage{Type: msgAck}); err != nil {
		log.Debug("could not acknowledge the guest agent's result", "err", err)
	}

	res = m.Result
	switch {
	case m.Error == "":
		return res, nil
	case m.Canceled && ctx.Err() != nil:
		return res, fmt.Errorf("build canceled: %w (agent: %s)", ctx.Err(), m.Error)
	case m.Canceled:
		return res, fmt.Errorf("build canceled by the agent: %s", m.Error)
	}
	return res, errors.New(m.Error)
}

func (h *Host) unresponsive() time.Duration {
	if h.Unresponsive > 0 {
		return h.Unresponsive
	}
	return time.Minute
}

func (h *Host) helloTimeout() time.Duration {
	if h.HelloTimeout > 0 {
		return h.HelloTimeout
	}
	return 2 * time.Minute
}

// prepare checks job and splits it into what goes on the wire.
func (h *Host) prepare(job Job) (Job, *memoryOnly, error) {
	for _, t := range job.Tunnels {
		if h.Tunnels[t.Name] == nil {
			return Job{}, nil, fmt.Errorf("guest job %s: tunnel %q has no host-side dialer; add it to Host.Tunnels", job.BuildID, t.Name)
		}
		if t.Listen == "" {
			return Job{}, nil, fmt.Errorf("guest job %s: tunnel %q has no listen address", job.BuildID, t.Name)
		}
	}
	if job.CacheDisk == "" {
		return Job{}, nil, fmt.Errorf("guest job %s: no cache disk serial", job.BuildID)
	}
	for _, d := range []struct{ what, dir string }{{"context", job.Solve.ContextDir}, {"dockerfile", job.Solve.DockerfileDir}} {
		if d.dir == "" {
			continue
		}
		if fi, err := os.Stat(d.dir); err != nil || !fi.IsDir() {
			return Job{}, nil, fmt.Errorf("guest job %s: %s dir %s is not a directory", job.BuildID, d.what, d.dir)
		}
	}
	if job.Solve.ContextDir == "" {
		return Job{}, nil, fmt.Errorf("guest job %s: solve request has no context dir", job.BuildID)
	}
	req, memory := splitMemory(job.Solve)
	req.ContextDir = treeContext
	if req.DockerfileDir != "" && req.DockerfileDir != job.Solve.ContextDir {
		req.DockerfileDir = treeDockerfile
	} else {
		req.DockerfileDir = ""
	}
	job.Solve = req
	return job, memory, nil
}

// handshake waits for the agent's hello and answers it. Nothing may be
// written before the hello arrives: a virtio-serial port drops data while
// the guest has it closed.
func (h *Host) handshake(ctx context.Context, conn io.ReadWriteCloser) (string, error) {
	timeout := h.helloTimeout()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var line []byte
	err := untilDone(hctx, conn, func() (err error) {
		line, err = readLine(conn, maxLine)
		return err
	})
	switch {
	case err != nil && ctx.Err() != nil:
		return "", fmt.Errorf("build canceled while waiting for the guest agent: %w", ctx.Err())
	case err != nil && hctx.Err() != nil:
		return "", fmt.Errorf("guest agent did not say hello within %s; did the VM boot? (check its console output)", timeout)
	case err != nil:
		return "", fmt.Errorf("%w before saying hello: %v", ErrAgentGone, err)
	}
	var hi hello
	if json.Unmarshal(line, &hi) != nil || hi.Proto != protoName {
		return "", fmt.Errorf("guest sent %q instead of a %s hello; is the builder image's kiln-agent from a different kiln?", preview(line), protoName)
	}
	if hi.Version != Version {
		msg := fmt.Sprintf("agent %q speaks %s protocol version %d, the host speaks version %d; rebuild the builder image with this kiln's kiln-agent", hi.Agent, protoName, hi.Version, Version)
		_ = untilDone(hctx, conn, func() error { return writeLine(conn, helloReply{Version: Version, Error: msg}) })
		return "", fmt.Errorf("%w: %s", ErrVersionMismatch, msg)
	}
	if err := untilDone(hctx, conn, func() error { return writeLine(conn, helloReply{Version: Version}) }); err != nil {
		return "", fmt.Errorf("%w: answer hello: %v", ErrAgentGone, err)
	}
	return hi.Agent, nil
}

// hostSession is the state of one Serve call.
type hostSession struct {
	h      *Host
	job    Job
	log    *slog.Logger
	mux    *yamux.Session
	muxLog *muxLogger
	ctx    context.Context
	wg     sync.WaitGroup

	// The control and events streams are opened once each.
	controlSeen, eventsSeen atomic.Bool
	control                 chan net.Conn
	eventsEnd               chan struct{}
	tunnels                 chan struct{} // semaphore of open tunnel connections

	sinkMu  sync.Mutex
	sink    progress.Sink
	stopped bool

	// frozen is set when watch gave up on an agent that stopped answering.
	frozen atomic.Bool
}

// watch pings the agent and ends the session once no ping was answered
// for limit. yamux's own keepalive is far more patient (see muxConfig)
// and has no way to say why it ended a session; this one does, through
// frozen.
func (s *hostSession) watch(limit time.Duration) {
	defer s.wg.Done()
	tick := time.NewTicker(limit / 4)
	defer tick.Stop()
	answered := make(chan struct{}, 1)
	last, pending := time.Now(), false
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.mux.CloseChan():
			return
		case <-answered:
			last, pending = time.Now(), false
		case <-tick.C:
			if time.Since(last) >= limit {
				s.log.Warn("guest agent answered no ping; giving up on it", "for", time.Since(last).Round(time.Second))
				s.frozen.Store(true)
				s.mux.Close()
				return
			}
			if !pending {
				// One ping at a time: a late answer still counts, and
				// answered (buffered) never blocks the pinger.
				pending = true
				go func() {
					if _, err := s.mux.Ping(); err == nil {
						answered <- struct{}{}
					}
				}()
			}
		}
	}
}

func (s *hostSession) acceptLoop() {
	defer s.wg.Done()
	for {
		stream, err := s.mux.Accept()
		if err != nil {
			return
		}
		// Headers are read off the accept loop, so a stream whose header
		// never comes cannot hold up the others.
		s.wg.Add(1)
		go s.handleStream(stream)
	}
}

func (s *hostSession) handleStream(stream net.Conn) {
	defer s.wg.Done()
	var hdr streamHeader
	if err := untilDone(s.ctx, stream, func() error { return readJSONLine(stream, &hdr) }); err != nil {
		s.log.Warn("guest opened a stream without a valid header", "err", err)
		stream.Close()
		return
	}
	refuse := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		s.log.Warn("refused a guest stream", "kind", hdr.Kind, "name", hdr.Name, "reason", msg)
		_ = writeLine(stream, streamReply{Error: msg})
		stream.Close()
	}
	switch hdr.Kind {
	case kindControl:
		if !s.controlSeen.CompareAndSwap(false, true) {
			refuse("the control stream is already open")
			return
		}
		if writeLine(stream, streamReply{}) == nil {
			s.control <- stream
		}
	case kindEvents:
		if !s.eventsSeen.CompareAndSwap(false, true) {
			refuse("the events stream is already open")
			return
		}
		if writeLine(stream, streamReply{}) != nil {
			close(s.eventsEnd)
			return
		}
		s.readEvents(stream)
	case kindContext:
		dir, ok := s.tree(hdr.Name)
		if !ok {
			refuse("no %s %q in this job", kindContext, hdr.Name)
			return
		}
		s.sendTree(stream, hdr.Name, dir)
	case kindTunnel:
		dial := s.h.Tunnels[hdr.Name]
		if dial == nil || !s.jobHasTunnel(hdr.Name) {
			refuse("no tunnel %q in this job", hdr.Name)
			return
		}
		select {
		case s.tunnels <- struct{}{}:
		default:
			refuse("too many open tunnel connections (limit %d)", maxTunnels)
			return
		}
		defer func() { <-s.tunnels }()
		s.serveTunnel(stream, hdr.Name, dial)
	default:
		refuse("unknown stream kind %q (host speaks protocol version %d)", hdr.Kind, Version)
	}
}

func (s *hostSession) jobHasTunnel(name string) bool {
	for _, t := range s.job.Tunnels {
		if t.Name == name {
			return true
		}
	}
	return false
}

func (s *hostSession) tree(name string) (string, bool) {
	switch {
	case name == treeContext:
		return s.job.Solve.ContextDir, true
	case name == treeDockerfile && s.job.Solve.DockerfileDir != "":
		return s.job.Solve.DockerfileDir, true
	}
	return "", false
}

func (s *hostSession) sendTree(stream net.Conn, name, dir string) {
	defer stream.Close()
	if err := writeLine(stream, streamReply{}); err != nil {
		return
	}
	err := untilDone(s.ctx, stream, func() error { return sendTreeChunked(stream, dir) })
	if err != nil && s.ctx.Err() == nil {
		s.log.Warn("sending the build context to the guest failed", "tree", name, "err", err)
	}
}

func (s *hostSession) serveTunnel(stream net.Conn, name string, dial Dialer) {
	dctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
	upstream, err := dial(dctx)
	cancel()
	if err != nil {
		s.log.Warn("tunnel dial failed", "tunnel", name, "err", err)
		_ = writeLine(stream, streamReply{Error: fmt.Sprintf("host could not connect tunnel %q: %v", name, err)})
		stream.Close()
		return
	}
	if err := writeLine(stream, streamReply{}); err != nil {
		upstream.Close()
		stream.Close()
		return
	}
	splice(s.ctx, stream, upstream)
}

func (s *hostSession) readEvents(stream net.Conn) {
	defer close(s.eventsEnd)
	defer stream.Close()
	fr := newFrameReader(stream)
	for {
		var f eventFrame
		if err := fr.read(&f); err != nil {
			if !errors.Is(err, io.EOF) && s.ctx.Err() == nil {
				s.log.Debug("guest events stream ended", "err", err)
			}
			return
		}
		if f.Event != nil {
			s.emit(*f.Event)
		}
		if f.Log != nil {
			s.guestLog(f.Log)
		}
	}
}

func (s *hostSession) emit(e progress.Event) {
	s.sinkMu.Lock()
	defer s.sinkMu.Unlock()
	if !s.stopped {
		s.sink.Emit(e)
	}
}

// stopSink makes sure the sink is never called after Serve returned.
func (s *hostSession) stopSink() {
	s.sinkMu.Lock()
	s.stopped = true
	s.sinkMu.Unlock()
}

func (s *hostSession) guestLog(r *logRecord) {
	var level slog.Level
	if level.UnmarshalText([]byte(r.Level)) != nil {
		level = slog.LevelInfo
	}
	attrs := []slog.Attr{slog.String("source", "guest")}
	for i := 0; i+1 < len(r.Attrs); i += 2 {
		attrs = append(attrs, slog.String(r.Attrs[i], r.Attrs[i+1]))
	}
	s.log.LogAttrs(s.ctx, level, "guest: "+r.Msg, attrs...)
}

// goneErr explains a control stream that ended before the result.
func (s *hostSession) goneErr(err error) error {
	if s.frozen.Load() {
		return fmt.Errorf("%w: no answer for %s while its VM kept running (a frozen guest; check its console output)", ErrAgentUnresponsive, s.h.unresponsive())
	}
	if errors.Is(err, io.EOF) || errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, io.ErrUnexpectedEOF) {
		why := "did the VM crash? check its console output"
		if l := s.muxLog.lastLine(); l != "" {
			why = "multiplexer: " + l + "; " + why
		}
		return fmt.Errorf("%w during the build: the connection closed without a result (%s)", ErrAgentGone, why)
	}
	return fmt.Errorf("%w during the build: %v", ErrAgentGone, err)
}
