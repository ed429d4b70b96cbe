package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// Host is the host side of the protocol. Connect sets up the agent on the
// other end of a connection; the Conn it returns runs jobs on it one after
// another, relaying each job's events, serving its context and its tunnels,
// and returning its result, until Release lets the agent go.
type Host struct {
	// Tunnels maps each Job.Tunnels name to the dialer that serves it,
	// for every job of a connection.
	Tunnels map[string]Dialer
	// HelloTimeout bounds the wait for the agent's hello, i.e. for the VM
	// to boot and the agent to start (default 2 minutes).
	HelloTimeout time.Duration
	// CancelGrace bounds the wait, after a job's ctx ended, for the agent
	// to confirm it stopped the job (default 30s). An agent that does not
	// confirm in time leaves the connection unusable (Conn.Err).
	CancelGrace time.Duration
	// Unresponsive is how long the agent may leave the host's pings
	// unanswered before the host gives up on it with ErrAgentUnresponsive
	// (default 60s), during a job or between jobs. A dead VM is noticed at
	// once (its channel closes); a frozen one keeps the channel open and is
	// only noticed this way.
	Unresponsive time.Duration
	// Logger receives the agent's log records and the host side's own.
	Logger *slog.Logger
}

// Conn is the host's side of one agent session: set up, and ready to run
// jobs one at a time. Its methods may be called from any goroutine, but
// Run and Release not concurrently with each other.
type Conn struct {
	h      *Host
	setup  Setup
	log    *slog.Logger
	conn   io.Closer
	mux    *yamux.Session
	muxLog *muxLogger
	// ctx ends every stream handler when the Conn closes.
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	controlSeen atomic.Bool
	control     chan net.Conn
	cw          *frameWriter
	released    chan agentMessage
	ctrlEnd     chan struct{} // closed when the control stream ended
	ctrlErr     error         // why; set before ctrlEnd closes

	// frozen is set when watch gave up on an agent that stopped answering.
	frozen atomic.Bool

	mu     sync.Mutex
	cur    *work // the setup or job running, nil when idle
	seq    int
	broken error // why no further job may run; nil while one may
	closed sync.Once
}

// work is the setup (seq 0) or one job on a Conn: what its streams may
// fetch and reach, and where its events go.
type work struct {
	seq int
	job *Job // host paths; nil for the setup
	// trees maps the job's context tree names (context, dockerfile,
	// named/N) to the host directories its context streams may fetch.
	trees map[string]string
	log   *slog.Logger
	done  chan agentMessage

	// ctx ends the work's stream handlers (context transfers, tunnel
	// connections) when the work ends; wg waits for them.
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	ended   bool // under Conn.mu: no more streams are admitted
	tunnels chan struct{}

	eventsSeen atomic.Bool
	eventsEnd  chan struct{}

	sinkMu  sync.Mutex
	sink    progress.Sink
	stopped bool
}

// Connect waits for the agent's hello on conn (typically the host end of
// a virtio-serial port; nothing is sent before the hello), has it set the
// builder up with setup, and returns once the agent reported it ready. The
// setup's events (the agent's phases, its log) go to sink. The Conn owns
// conn from here; on error conn is closed.
//
// When ctx ends during the setup, Connect asks the agent to cancel it and
// waits up to CancelGrace. ctx only bounds Connect: the Conn outlives it.
func (h *Host) Connect(ctx context.Context, conn io.ReadWriteCloser, setup Setup, sink progress.Sink) (*Conn, error) {
	if setup.CacheDisk == "" {
		conn.Close()
		return nil, errors.New("guest setup: no cache disk serial")
	}
	log := h.Logger
	if log == nil {
		log = slog.Default()
	}
	agent, err := h.handshake(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	log.Debug("guest agent connected", "agent", agent)

	muxLog := &muxLogger{log: log}
	mux, err := yamux.Server(conn, muxConfig(muxLog))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start guest multiplexer: %w", err)
	}
	c := &Conn{
		h:        h,
		setup:    setup,
		log:      log,
		conn:     conn,
		mux:      mux,
		muxLog:   muxLog,
		control:  make(chan net.Conn, 1),
		released: make(chan agentMessage, 1),
		ctrlEnd:  make(chan struct{}),
	}
	c.ctx, c.stop = context.WithCancel(context.Background())
	c.wg.Add(2)
	go c.acceptLoop()
	go c.watch(h.unresponsive())

	fail := func(err error) (*Conn, error) {
		c.Close()
		return nil, err
	}
	var control net.Conn
	select {
	case control = <-c.control:
	case <-mux.CloseChan():
		if c.frozen.Load() {
			return fail(c.goneErr(yamux.ErrSessionShutdown, "before the setup"))
		}
		return fail(fmt.Errorf("%w: the connection closed before the agent opened its control stream", ErrAgentGone))
	case <-ctx.Done():
		return fail(fmt.Errorf("builder setup canceled: %w", ctx.Err()))
	case <-time.After(h.helloTimeout()):
		return fail(fmt.Errorf("guest agent said hello but did not open its control stream within %s", h.helloTimeout()))
	}
	c.cw = &frameWriter{w: control}
	c.wg.Add(1)
	go c.readControl(control)

	w := c.newWork(0, nil, sink, log)
	m, err := c.exchange(ctx, w, hostMessage{Type: msgSetup, Seq: 0, Setup: &setup})
	switch {
	case err != nil:
		return fail(err)
	case m.Error == "":
		return c, nil
	case m.Canceled && ctx.Err() != nil:
		return fail(fmt.Errorf("builder setup canceled: %w (agent: %s)", ctx.Err(), m.Error))
	}
	return fail(errors.New(m.Error))
}

// Run runs job on the agent and returns its result. Its events reach sink
// in the order the agent emitted them, and never after Run returned. Its
// context streams and tunnel connections are the job's: none is admitted
// before it started or after it ended, and any still open are closed
// before Run returns.
//
// When ctx ends Run asks the agent to cancel the job, waits up to
// CancelGrace for it to confirm, and returns an error wrapping ctx.Err();
// without a confirmation the Conn is unusable from then on. When the
// connection ends before the agent answered, the error wraps
// ErrAgentGone (ErrAgentUnresponsive for a frozen agent).
func (c *Conn) Run(ctx context.Context, job Job, sink progress.Sink) (res solve.Result, err error) {
	log := c.log.With("build", job.BuildID)
	if err := c.Err(); err != nil {
		return res, fmt.Errorf("guest job %s: the builder cannot take it: %w", job.BuildID, err)
	}
	if !job.Setup().equal(c.setup) {
		return res, fmt.Errorf("guest job %s: its builder setup differs from the one the agent was set up with; run it on a builder set up for it", job.BuildID)
	}
	wire, memory, trees, err := c.h.prepare(job)
	if err != nil {
		return res, err
	}
	c.mu.Lock()
	c.seq++
	seq := c.seq
	c.mu.Unlock()
	w := c.newWork(seq, &job, sink, log)
	w.trees = trees
	m, err := c.exchange(ctx, w, hostMessage{Type: msgJob, Seq: seq, Job: &wire, Memory: memory})
	if err != nil {
		return res, err
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

// Release tells an idle agent to stop buildkitd, release the volume and
// exit, waits for it to confirm (or for ctx to end), and closes the Conn.
// It returns the agent's error if it could not release the volume cleanly.
func (c *Conn) Release(ctx context.Context) error {
	defer c.Close()
	c.mu.Lock()
	busy := c.cur != nil
	c.mu.Unlock()
	if busy {
		return errors.New("guest: cannot release the agent while a job runs on it")
	}
	select {
	case <-c.ctrlEnd:
		return c.goneErr(c.ctrlErr, "before the release")
	default:
	}
	if err := c.cw.write(hostMessage{Type: msgRelease}); err != nil {
		return fmt.Errorf("%w: send release: %v", ErrAgentGone, err)
	}
	select {
	case m := <-c.released:
		if m.Error != "" {
			return fmt.Errorf("guest agent could not release the builder cleanly: %s", m.Error)
		}
		return nil
	case <-c.ctrlEnd:
		return c.goneErr(c.ctrlErr, "during the release")
	case <-ctx.Done():
		return fmt.Errorf("guest agent did not confirm the release: %w", ctx.Err())
	}
}

// Close ends the connection without a release; the agent sees the host
// go away (and releases the volume by itself if it still can). It is safe
// to call more than once.
func (c *Conn) Close() error {
	c.closed.Do(func() {
		c.setBroken(errors.New("the connection to the agent was closed"))
		c.stop()
		c.mux.Close()
		c.conn.Close()
		c.wg.Wait()
	})
	return nil
}

// Done is closed when the connection to the agent ended: closed, the VM
// gone, or the agent given up on as frozen.
func (c *Conn) Done() <-chan struct{} { return c.mux.CloseChan() }

// Err is nil while the Conn can run another job, else why it cannot: the
// agent went away or froze (wrapping ErrAgentGone), a cancel was not
// confirmed in time, the agent reported its builder broken.
func (c *Conn) Err() error {
	select {
	case <-c.mux.CloseChan():
		c.setBroken(c.goneErr(yamux.ErrSessionShutdown, "between jobs"))
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken
}

func (c *Conn) setBroken(err error) {
	c.mu.Lock()
	if c.broken == nil {
		c.broken = err
	}
	c.mu.Unlock()
}

func (c *Conn) newWork(seq int, job *Job, sink progress.Sink, log *slog.Logger) *work {
	if sink == nil {
		sink = progress.Discard
	}
	w := &work{
		seq:       seq,
		job:       job,
		log:       log,
		done:      make(chan agentMessage, 1),
		tunnels:   make(chan struct{}, maxTunnels),
		eventsEnd: make(chan struct{}),
		sink:      sink,
	}
	w.ctx, w.cancel = context.WithCancel(c.ctx)
	return w
}

// exchange runs w: it sends msg, waits for the agent's done (asking it to
// cancel when ctx ends), waits for the events, ends w's streams and
// acknowledges.
func (c *Conn) exchange(ctx context.Context, w *work, msg hostMessage) (m agentMessage, err error) {
	c.mu.Lock()
	if c.cur != nil {
		c.mu.Unlock()
		return m, fmt.Errorf("guest: job %d is still running; jobs run one at a time", c.cur.seq)
	}
	c.cur = w
	c.mu.Unlock()
	defer c.end(w)
	what := "the setup"
	if w.seq > 0 {
		what = "the build"
	}

	if err := c.cw.write(msg); err != nil {
		c.setBroken(fmt.Errorf("%w: %v", ErrAgentGone, err))
		return m, fmt.Errorf("%w: send %s: %v", ErrAgentGone, msg.Type, err)
	}
	select {
	case m = <-w.done:
	case <-c.ctrlEnd:
		err := c.goneErr(c.ctrlErr, "during "+what)
		c.setBroken(err)
		return m, err
	case <-ctx.Done():
		if err := c.cw.write(hostMessage{Type: msgCancel, Seq: w.seq}); err != nil {
			c.setBroken(fmt.Errorf("the agent could not be told to cancel: %v", err))
			return m, fmt.Errorf("%s canceled: %w (the agent could not be told: %v)", what, ctx.Err(), err)
		}
		grace := c.h.CancelGrace
		if grace == 0 {
			grace = 30 * time.Second
		}
		select {
		case m = <-w.done:
		case <-c.ctrlEnd:
			c.setBroken(c.goneErr(c.ctrlErr, "while canceling"))
			return m, fmt.Errorf("%s canceled: %w (the agent went away before confirming: %v)", what, ctx.Err(), c.ctrlErr)
		case <-time.After(grace):
			c.setBroken(fmt.Errorf("the agent did not confirm within %s that it stopped job %d", grace, w.seq))
			return m, fmt.Errorf("%s canceled: %w (the agent did not confirm within %s that it stopped)", what, ctx.Err(), grace)
		}
	}

	// The agent closes its events stream before it sends done, so every
	// event it emitted is already on its way.
	select {
	case <-w.eventsEnd:
	case <-time.After(eventsDrain):
		w.log.Warn("guest agent's events stream did not end after its result; later events are dropped")
	}
	c.end(w)
	if err := c.cw.write(hostMessage{Type: msgAck, Seq: w.seq}); err != nil {
		w.log.Debug("could not acknowledge the guest agent's result", "err", err)
	}
	if m.Broken != "" {
		c.setBroken(fmt.Errorf("the agent reported its builder broken: %s", m.Broken))
	}
	return m, nil
}

// end ends w: no more streams for it, the open ones closed, no events
// after. Safe to call twice.
func (c *Conn) end(w *work) {
	c.mu.Lock()
	w.ended = true
	if c.cur == w {
		c.cur = nil
	}
	c.mu.Unlock()
	w.cancel()
	w.wg.Wait()
	w.sinkMu.Lock()
	w.stopped = true
	w.sinkMu.Unlock()
}

// admit registers a stream handler with the running work of seq, or
// reports why there is none.
func (c *Conn) admit(seq int) (*work, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.cur
	if w == nil || w.ended || w.seq != seq {
		return nil, fmt.Errorf("job %d is not running", seq)
	}
	w.wg.Add(1)
	return w, nil
}

// readControl reads the agent's control frames for the whole session and
// hands each done to the work it belongs to.
func (c *Conn) readControl(control net.Conn) {
	defer c.wg.Done()
	fr := newFrameReader(control)
	for {
		var m agentMessage
		if err := fr.read(&m); err != nil {
			c.ctrlErr = err
			close(c.ctrlEnd)
			// A control stream that failed (an oversized frame, garbage)
			// leaves nothing to talk over.
			c.mux.Close()
			return
		}
		switch m.Type {
		case msgDone:
			c.mu.Lock()
			w := c.cur
			c.mu.Unlock()
			if w == nil || w.seq != m.Seq {
				c.log.Warn("guest agent sent a result for a job that is not running; ignoring it", "seq", m.Seq)
				continue
			}
			select {
			case w.done <- m:
			default:
				c.log.Warn("guest agent sent a second result for a job; ignoring it", "seq", m.Seq)
			}
		case msgReleased:
			select {
			case c.released <- m:
			default:
			}
		default:
			c.log.Warn("guest agent sent an unknown control message; ignoring it", "type", m.Type)
		}
	}
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

// prepare checks job and splits it into what goes on the wire and the
// context trees (tree name → host dir) its context streams may fetch.
func (h *Host) prepare(job Job) (Job, *memoryOnly, map[string]string, error) {
	fail := func(format string, args ...any) (Job, *memoryOnly, map[string]string, error) {
		return Job{}, nil, nil, fmt.Errorf("guest job %s: "+format, append([]any{job.BuildID}, args...)...)
	}
	for _, t := range job.Tunnels {
		if h.Tunnels[t.Name] == nil {
			return fail("tunnel %q has no host-side dialer; add it to Host.Tunnels", t.Name)
		}
		if t.Listen == "" {
			return fail("tunnel %q has no listen address", t.Name)
		}
	}
	isDir := func(dir string) bool {
		fi, err := os.Stat(dir)
		return err == nil && fi.IsDir()
	}
	for _, d := range []struct{ what, dir string }{{"context", job.Solve.ContextDir}, {"dockerfile", job.Solve.DockerfileDir}} {
		if d.dir != "" && !isDir(d.dir) {
			return fail("%s dir %s is not a directory", d.what, d.dir)
		}
	}
	if job.Solve.ContextDir == "" {
		return fail("solve request has no context dir")
	}
	if len(job.Solve.SSH) > 0 && job.Solve.SSHAgent == nil {
		return fail("solve request names ssh agents %v but has no SSHAgent to reach them", job.Solve.SSH)
	}
	req, memory := splitMemory(job.Solve)
	trees := map[string]string{treeContext: job.Solve.ContextDir}
	req.ContextDir = treeContext
	if req.DockerfileDir != "" && req.DockerfileDir != job.Solve.ContextDir {
		trees[treeDockerfile] = job.Solve.DockerfileDir
		req.DockerfileDir = treeDockerfile
	} else {
		req.DockerfileDir = ""
	}
	// Each named local context is a tree of its own, numbered in the
	// order of the sorted names; the guest sees only the tree names.
	if len(job.Solve.LocalContexts) > 0 {
		req.LocalContexts = make(map[string]string, len(job.Solve.LocalContexts))
		for i, name := range slices.Sorted(maps.Keys(job.Solve.LocalContexts)) {
			dir := job.Solve.LocalContexts[name]
			if name == "" || dir == "" {
				return fail("named local context %q has no name or no dir", name)
			}
			if !isDir(dir) {
				return fail("named local context %s: %s is not a directory", name, dir)
			}
			tree := treeNamed + strconv.Itoa(i)
			trees[tree] = dir
			req.LocalContexts[name] = tree
		}
	}
	job.Solve = req
	return job, memory, trees, nil
}

// Serve is the one-shot form: it connects to the agent with job's setup,
// runs job and releases the agent. The connection is closed when Serve
// returns.
func (h *Host) Serve(ctx context.Context, conn io.ReadWriteCloser, job Job, sink progress.Sink) (solve.Result, error) {
	if sink == nil {
		sink = progress.Discard
	}
	c, err := h.Connect(ctx, conn, job.Setup(), sink)
	if err != nil {
		return solve.Result{}, err
	}
	defer c.Close()
	res, err := c.Run(ctx, job, sink)
	if c.Err() == nil && ctx.Err() == nil {
		if rerr := c.Release(ctx); rerr != nil && err == nil {
			err = rerr
		}
	}
	return res, err
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

// watch pings the agent and ends the session once no ping was answered
// for limit, during a job or between jobs. yamux's own keepalive is far
// more patient (see muxConfig) and has no way to say why it ended a
// session; this one does, through frozen.
func (c *Conn) watch(limit time.Duration) {
	defer c.wg.Done()
	tick := time.NewTicker(limit / 4)
	defer tick.Stop()
	answered := make(chan struct{}, 1)
	last, pending := time.Now(), false
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.mux.CloseChan():
			return
		case <-answered:
			last, pending = time.Now(), false
		case <-tick.C:
			if time.Since(last) >= limit {
				c.log.Warn("guest agent answered no ping; giving up on it", "for", time.Since(last).Round(time.Second))
				c.frozen.Store(true)
				c.mux.Close()
				return
			}
			if !pending {
				// One ping at a time: a late answer still counts, and
				// answered (buffered) never blocks the pinger.
				pending = true
				go func() {
					if _, err := c.mux.Ping(); err == nil {
						answered <- struct{}{}
					}
				}()
			}
		}
	}
}

func (c *Conn) acceptLoop() {
	defer c.wg.Done()
	for {
		stream, err := c.mux.Accept()
		if err != nil {
			return
		}
		// Headers are read off the accept loop, so a stream whose header
		// never comes cannot hold up the others.
		c.wg.Add(1)
		go c.handleStream(stream)
	}
}

func (c *Conn) handleStream(stream net.Conn) {
	defer c.wg.Done()
	var hdr streamHeader
	if err := untilDone(c.ctx, stream, func() error { return readJSONLine(stream, &hdr) }); err != nil {
		c.log.Warn("guest opened a stream without a valid header", "err", err)
		stream.Close()
		return
	}
	refuse := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		c.log.Warn("refused a guest stream", "kind", hdr.Kind, "name", hdr.Name, "seq", hdr.Seq, "reason", msg)
		_ = writeLine(stream, streamReply{Error: msg})
		stream.Close()
	}
	if hdr.Kind == kindControl {
		if !c.controlSeen.CompareAndSwap(false, true) {
			refuse("the control stream is already open")
			return
		}
		if writeLine(stream, streamReply{}) == nil {
			c.control <- stream
		}
		return
	}
	switch hdr.Kind {
	case kindEvents, kindContext, kindTunnel:
	default:
		refuse("unknown stream kind %q (host speaks protocol version %d)", hdr.Kind, Version)
		return
	}
	w, err := c.admit(hdr.Seq)
	if err != nil {
		refuse("%v", err)
		return
	}
	defer w.wg.Done()
	switch hdr.Kind {
	case kindEvents:
		if !w.eventsSeen.CompareAndSwap(false, true) {
			refuse("the events stream of job %d is already open", w.seq)
			return
		}
		if writeLine(stream, streamReply{}) != nil {
			close(w.eventsEnd)
			stream.Close()
			return
		}
		w.readEvents(stream)
	case kindContext:
		dir, ok := w.tree(hdr.Name)
		if !ok {
			refuse("no %s %q in job %d", kindContext, hdr.Name, w.seq)
			return
		}
		w.sendTree(stream, hdr.Name, dir)
	case kindTunnel:
		dial, ok := w.tunnelDialer(c.h, hdr.Name)
		if !ok {
			refuse("no tunnel %q in job %d", hdr.Name, w.seq)
			return
		}
		select {
		case w.tunnels <- struct{}{}:
		default:
			refuse("too many open tunnel connections (limit %d)", maxTunnels)
			return
		}
		defer func() { <-w.tunnels }()
		w.serveTunnel(stream, hdr.Name, dial)
	}
}

func (w *work) hasTunnel(name string) bool {
	if w.job == nil {
		return false
	}
	for _, t := range w.job.Tunnels {
		if t.Name == name {
			return true
		}
	}
	return false
}

// tree is the host dir of the work's context tree name: only the trees of
// this job's own request.
func (w *work) tree(name string) (string, bool) {
	dir, ok := w.trees[name]
	return dir, ok
}

func (w *work) sendTree(stream net.Conn, name, dir string) {
	defer stream.Close()
	if err := writeLine(stream, streamReply{}); err != nil {
		return
	}
	err := untilDone(w.ctx, stream, func() error { return sendTreeChunked(stream, dir) })
	if err != nil && w.ctx.Err() == nil {
		w.log.Warn("sending the build context to the guest failed", "tree", name, "err", err)
	}
}

func (w *work) serveTunnel(stream net.Conn, name string, dial Dialer) {
	dctx, cancel := context.WithTimeout(w.ctx, 30*time.Second)
	upstream, err := dial(dctx)
	cancel()
	if err != nil {
		w.log.Warn("tunnel dial failed", "tunnel", name, "err", err)
		_ = writeLine(stream, streamReply{Error: fmt.Sprintf("host could not connect tunnel %q: %v", name, err)})
		stream.Close()
		return
	}
	if err := writeLine(stream, streamReply{}); err != nil {
		upstream.Close()
		stream.Close()
		return
	}
	// Ends with the job at the latest: w.ctx closes both ends.
	splice(w.ctx, stream, upstream)
}

// readEvents relays the work's events stream until the agent closes it
// or the work ends.
func (w *work) readEvents(stream net.Conn) {
	defer close(w.eventsEnd)
	defer stream.Close()
	ctx := w.ctx
	stopClose := context.AfterFunc(ctx, func() { closeNow(stream) })
	defer stopClose()
	fr := newFrameReader(stream)
	for {
		var f eventFrame
		if err := fr.read(&f); err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				w.log.Debug("guest events stream ended", "err", err)
			}
			return
		}
		if f.Event != nil {
			w.emit(*f.Event)
		}
		if f.Log != nil {
			w.guestLog(f.Log)
		}
	}
}

func (w *work) emit(e progress.Event) {
	w.sinkMu.Lock()
	defer w.sinkMu.Unlock()
	if !w.stopped {
		w.sink.Emit(e)
	}
}

func (w *work) guestLog(r *logRecord) {
	var level slog.Level
	if level.UnmarshalText([]byte(r.Level)) != nil {
		level = slog.LevelInfo
	}
	attrs := []slog.Attr{slog.String("source", "guest")}
	for i := 0; i+1 < len(r.Attrs); i += 2 {
		attrs = append(attrs, slog.String(r.Attrs[i], r.Attrs[i+1]))
	}
	w.log.LogAttrs(context.Background(), level, "guest: "+r.Msg, attrs...)
}

// goneErr explains a control stream that ended; when says during what.
func (c *Conn) goneErr(err error, when string) error {
	if c.frozen.Load() {
		return fmt.Errorf("%w: no answer for %s while its VM kept running (a frozen guest; check its console output)", ErrAgentUnresponsive, c.h.unresponsive())
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		why := "did the VM crash? check its console output"
		if l := c.muxLog.lastLine(); l != "" {
			why = "multiplexer: " + l + "; " + why
		}
		return fmt.Errorf("%w %s: the connection closed without a result (%s)", ErrAgentGone, when, why)
	}
	return fmt.Errorf("%w %s: %v", ErrAgentGone, when, err)
}
