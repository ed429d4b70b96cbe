package egress

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// idleConn closes itself once no byte has moved either way for idle. One
// watch covers both directions, so a long upload with a silent server (or
// a long download with a silent client) is not idle.
type idleConn struct {
	net.Conn
	idle  time.Duration
	last  atomic.Int64 // UnixNano of the last byte moved
	mu    sync.Mutex
	timer *time.Timer
	done  bool
}

func newIdleConn(c net.Conn, idle time.Duration) *idleConn {
	ic := &idleConn{Conn: c, idle: idle}
	ic.last.Store(time.Now().UnixNano())
	ic.mu.Lock()
	ic.timer = time.AfterFunc(idle, ic.check)
	ic.mu.Unlock()
	return ic
}

func (c *idleConn) check() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	since := time.Since(time.Unix(0, c.last.Load()))
	if since >= c.idle {
		c.done = true
		c.Conn.Close()
		return
	}
	c.timer.Reset(c.idle - since)
}

func (c *idleConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.last.Store(time.Now().UnixNano())
	}
	return n, err
}

func (c *idleConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.last.Store(time.Now().UnixNano())
	}
	return n, err
}

func (c *idleConn) Close() error {
	c.mu.Lock()
	c.done = true
	c.timer.Stop()
	c.mu.Unlock()
	return c.Conn.Close()
}

func (c *idleConn) CloseWrite() error {
	closeWrite(c.Conn)
	return nil
}

// splice copies both ways until both directions ended or ctx is done, then
// closes both ends. A direction that reaches EOF is passed on as a
// half-close, so a client that finished sending still gets its answer; a
// direction that fails ends both.
func splice(ctx context.Context, a, b net.Conn) {
	var wg sync.WaitGroup
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	one := func(dst, src net.Conn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			closeBoth()
			return
		}
		closeWrite(dst)
	}
	wg.Add(2)
	go one(a, b)
	go one(b, a)
	stop := context.AfterFunc(ctx, closeBoth)
	wg.Wait()
	stop()
	closeBoth()
}

// closeWrite half-closes c where the connection type allows it.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// connPair returns two connected unix stream sockets: an in-process
// connection that, unlike net.Pipe, supports half-close and buffers like a
// real socket.
func connPair() (a, b net.Conn, err error) {
	syscall.ForkLock.RLock()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err == nil {
		syscall.CloseOnExec(fds[0])
		syscall.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, fmt.Errorf("create socket pair: %w", err)
	}
	conn := func(fd int) (net.Conn, error) {
		f := os.NewFile(uintptr(fd), "egress-pair")
		defer f.Close() // FileConn holds its own duplicate
		return net.FileConn(f)
	}
	if a, err = conn(fds[0]); err != nil {
		syscall.Close(fds[1])
		return nil, nil, fmt.Errorf("wrap socket pair: %w", err)
	}
	if b, err = conn(fds[1]); err != nil {
		a.Close()
		return nil, nil, fmt.Errorf("wrap socket pair: %w", err)
	}
	return a, b, nil
}

// oneConnListener hands out a single connection, then blocks until closed,
// so an http.Server can serve exactly that connection.
type oneConnListener struct {
	conn      net.Conn
	taken     atomic.Bool
	closeOnce sync.Once
	closed    chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if l.taken.CompareAndSwap(false, true) {
		return l.conn, nil
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }
