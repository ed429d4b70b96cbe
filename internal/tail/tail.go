// Package tail keeps the last bytes of a stream — a child process's
// stderr, a VM's console — so an error can show what it said last without
// holding all of it.
package tail

import (
	"bytes"
	"sync"
)

// Buffer is an io.Writer that keeps the last N bytes written to it. It is
// safe for concurrent use.
type Buffer struct {
	mu  sync.Mutex
	n   int
	buf []byte
}

// New returns a Buffer keeping the last n bytes.
func New(n int) *Buffer { return &Buffer{n: n} }

func (r *Buffer) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, p...)
	if over := len(r.buf) - r.n; over > 0 {
		r.buf = append(r.buf[:0], r.buf[over:]...)
	}
	return len(p), nil
}

// String returns what is kept, with any UTF-8 sequence cut at the start
// dropped.
func (r *Buffer) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return string(bytes.ToValidUTF8(r.buf, nil))
}
