package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/guest"
)

// ServeConn serves one client connection (one guest tunnel stream) until
// the client closes it, it idles out, or ctx ends; it closes conn before
// returning. The client may send any number of requests on it, or one
// CONNECT that turns it into a tunnel.
func (p *Proxy) ServeConn(ctx context.Context, conn net.Conn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Each client connection gets its own upstream pool, so nothing
	// outlives it; clients pool their connection to the proxy anyway.
	tr := &http.Transport{
		Proxy:       nil, // never chain to the host's own HTTP_PROXY
		DialContext: p.dialForward,
		// Bodies pass through as they are; decompressing would change
		// what the build downloads.
		DisableCompression:    true,
		ResponseHeaderTimeout: p.cfg.IdleTimeout,
		IdleConnTimeout:       p.cfg.IdleTimeout,
		MaxIdleConnsPerHost:   4,
	}
	defer tr.CloseIdleConnections()

	s := &session{p: p, tr: tr}
	ln := &oneConnListener{conn: conn, closed: make(chan struct{})}
	errLog := slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)
	srv := &http.Server{
		Handler:     s,
		BaseContext: func(net.Listener) context.Context { return ctx },
		ConnState: func(_ net.Conn, st http.ConnState) {
			// The one connection is done with the server (closed, or
			// hijacked by a CONNECT handler): stop accepting.
			if st == http.StateClosed || st == http.StateHijacked {
				ln.Close()
			}
		},
		ReadHeaderTimeout:            p.cfg.IdleTimeout,
		IdleTimeout:                  p.cfg.IdleTimeout,
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     errLog,
	}
	s.rp = &httputil.ReverseProxy{
		Rewrite:   rewrite,
		Transport: tr,
		// Flush every write, so a slowly streamed response (logs,
		// progress) reaches the build as it comes.
		FlushInterval: -1,
		ErrorHandler:  s.forwardFailed,
		ErrorLog:      errLog,
	}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	_ = srv.Serve(ln)
	// A hijacked connection (a tunnel) is still being served by its
	// handler; wait for it, and for a handler that ctx is ending.
	s.handlers.closeAndWait()
	srv.Close()
	conn.Close()
}

// Dialer returns a guest.Dialer for Host.Tunnels["egress"]: each call
// returns one end of a fresh connection pair and serves the other end with
// ServeConn until ctx (the build's) ends. The pair is a unix socketpair, not
// a net.Pipe, because the tunnel passes half-closes on with CloseWrite, and
// a net.Pipe can only close both directions at once.
func (p *Proxy) Dialer(ctx context.Context) guest.Dialer {
	return func(context.Context) (net.Conn, error) {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("egress proxy for this build has stopped: %w", err)
		}
		client, server, err := connPair()
		if err != nil {
			return nil, fmt.Errorf("egress proxy: %w", err)
		}
		go p.ServeConn(ctx, server)
		return client, nil
	}
}

// ListenAndServe serves every connection ln accepts until ctx ends, then
// closes ln and every connection and returns nil once all are closed. It
// returns an error only when accepting fails for good.
func (p *Proxy) ListenAndServe(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("egress proxy on %s: listener closed: %w", ln.Addr(), err)
			}
			// Out of file descriptors and the like pass; back off
			// instead of spinning.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.log.Warn("egress proxy accept failed; retrying", "addr", ln.Addr().String(), "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.ServeConn(ctx, c)
		}()
	}
}

// session serves the requests of one client connection.
type session struct {
	p        *Proxy
	tr       *http.Transport
	rp       *httputil.ReverseProxy
	handlers gate
}

func (s *session) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.handlers.enter() {
		return
	}
	defer s.handlers.leave()
	if r.Method == http.MethodConnect {
		s.connect(w, r)
		return
	}
	s.forward(w, r)
}

func (s *session) connect(w http.ResponseWriter, r *http.Request) {
	host, portStr, err := net.SplitHostPort(r.Host)
	port, perr := strconv.Atoi(portStr)
	if err != nil || perr != nil || host == "" {
		badRequest(w, fmt.Sprintf("CONNECT needs host:port, got %q", r.Host))
		return
	}
	t, d := s.p.check(host, port)
	if d != nil {
		s.deny(w, d)
		return
	}
	up, err := s.p.dial(r.Context(), t)
	if err != nil {
		s.dialFailed(w, r, t.host, t.port, err)
		return
	}
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		up.Close()
		s.p.log.Warn("egress proxy could not take over the client connection", "err", err)
		http.Error(w, "kiln egress proxy: cannot open a tunnel on this connection", http.StatusInternalServerError)
		return
	}
	_ = client.SetDeadline(time.Time{})
	s.p.log.Debug("egress tunnel open", "host", t.host, "port", t.port)
	if _, err := io.WriteString(client, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		up.Close()
		client.Close()
		return
	}
	// Clients may send their first bytes (a TLS hello) right behind the
	// CONNECT; the server has read them into its buffer already.
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		if _, err := up.Write(early); err != nil {
			up.Close()
			client.Close()
			return
		}
	}
	splice(r.Context(), client, up)
	s.p.log.Debug("egress tunnel closed", "host", t.host, "port", t.port)
}

func (s *session) forward(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Host == "":
		badRequest(w, "this is an HTTP proxy: send absolute-URI requests (GET http://host/path) or CONNECT, e.g. by setting HTTP_PROXY/HTTPS_PROXY")
		return
	case r.URL.Scheme != "http":
		badRequest(w, fmt.Sprintf("%s:// URLs must go through CONNECT; set HTTPS_PROXY for them", r.URL.Scheme))
		return
	}
	host, port := r.URL.Hostname(), 80
	if ps := r.URL.Port(); ps != "" {
		n, err := strconv.Atoi(ps)
		if err != nil {
			badRequest(w, fmt.Sprintf("bad port in %q", r.URL.Host))
			return
		}
		port = n
	}
	if _, d := s.p.check(host, port); d != nil {
		s.deny(w, d)
		return
	}
	s.rp.ServeHTTP(w, r)
}

// rewrite prepares the upstream request. ReverseProxy has already dropped
// the hop-by-hop headers; with Rewrite set it also adds no X-Forwarded-*.
func rewrite(pr *httputil.ProxyRequest) {
	// The URL is the absolute URI the client asked for; the Host header
	// must agree with the host that was checked and will be dialed.
	pr.Out.Host = ""
	// The proxy's own server already answered "100 Continue" to the client
	// when the body was first read, so upstream need not.
	pr.Out.Header.Del("Expect")
}

// dialForward is the upstream Transport's dialer: the name and port were
// checked by forward, the addresses are checked here.
func (p *Proxy) dialForward(ctx context.Context, _, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("bad port in %q", addr)
	}
	t, d := p.check(host, port)
	if d != nil {
		return nil, d
	}
	return p.dial(ctx, t)
}

func (s *session) forwardFailed(w http.ResponseWriter, r *http.Request, err error) {
	host, port := r.URL.Hostname(), 80
	if n, perr := strconv.Atoi(r.URL.Port()); perr == nil {
		port = n
	}
	s.dialFailed(w, r, host, port, err)
}

// dialFailed answers a request whose upstream could not be reached (or
// stopped answering) with 403 for a denial and 502 otherwise.
func (s *session) dialFailed(w http.ResponseWriter, r *http.Request, host string, port int, err error) {
	var d *denial
	if errors.As(err, &d) {
		s.deny(w, d)
		return
	}
	if r.Context().Err() != nil {
		// The client or the build went away; nobody reads an answer.
		return
	}
	// err from the Transport is a *url.Error carrying the full URL, which
	// may hold tokens: report only its cause.
	var ue *url.Error
	for errors.As(err, &ue) {
		err = ue.Err
	}
	s.p.log.Info("egress upstream failed", "host", host, "port", port, "err", err)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusBadGateway)
	fmt.Fprintf(w, "kiln egress proxy: %s: %v\n", net.JoinHostPort(host, strconv.Itoa(port)), err)
}

func (s *session) deny(w http.ResponseWriter, d *denial) {
	s.p.log.Info("egress denied", "host", d.host, "port", d.port, "reason", d.reason)
	if s.p.cfg.OnDenied != nil {
		s.p.cfg.OnDenied(d.host, d.port, d.reason)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusForbidden)
	io.WriteString(w, d.Error()+"\n")
}

func badRequest(w http.ResponseWriter, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Connection", "close")
	w.WriteHeader(http.StatusBadRequest)
	io.WriteString(w, "kiln egress proxy: "+msg+"\n")
}

// gate counts running handlers and, once closed, lets no new one start, so
// ServeConn can wait for them without racing a handler about to begin.
type gate struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func (g *gate) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *gate) leave() { g.wg.Done() }

func (g *gate) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}
