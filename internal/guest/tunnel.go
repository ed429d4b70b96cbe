package guest

import (
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// Dialer opens the host-side end of one tunnel connection. DialTCP covers
// a plain forward (kiln's registry); an in-process service such as an
// HTTP CONNECT egress proxy can return one end of a net.Pipe and serve the
// other.
type Dialer func(ctx context.Context) (net.Conn, error)

// DialTCP forwards each tunnel connection to addr on the host.
func DialTCP(addr string) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
}

// splice copies both ways until both directions ended or ctx is done, then
// closes both ends. Each direction's end is passed on as a half-close, so
// a peer that finishes sending can still receive the reply.
func splice(ctx context.Context, a, b net.Conn) {
	var wg sync.WaitGroup
	one := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		closeWrite(dst)
	}
	wg.Add(2)
	go one(a, b)
	go one(b, a)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	closeNow(a)
	closeNow(b)
	<-done
}

// closeNow closes c and makes its blocked reads and writes return. A yamux
// stream's Close alone is a half-close that leaves a pending Read waiting
// for the peer, and the session outlives a job, so it gets a deadline too.
func closeNow(c io.Closer) {
	if d, ok := c.(interface{ SetDeadline(time.Time) error }); ok {
		_ = d.SetDeadline(time.Now())
	}
	_ = c.Close()
}

// closeWrite half-closes c where the connection type allows it. A yamux
// stream's Close is a half-close (it sends FIN and can still read).
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
