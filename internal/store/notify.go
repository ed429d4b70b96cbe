package store

// PostgreSQL's shared-state primitives for nodes sharing one database:
// wakes through LISTEN/NOTIFY (this file) and advisory locks held on
// connections of their own (locks.go). They hold connections outside the
// *sql.DB pool: a LISTEN, a build slot or a registry write holds its
// connection for long, and must never starve the pool the work it guards
// needs (a registry write ends by recording its image through the pool).

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// dialConfig is the configuration the pool's connections were opened
// with, borrowed from one of them: DB keeps no URL, and the config holds
// everything pgx resolved (password file, TLS, application_name).
func (s *DB) dialConfig(ctx context.Context) (*pgx.ConnConfig, error) {
	if s.dialect != Postgres {
		return nil, fmt.Errorf("database %s is not PostgreSQL", s.where)
	}
	c, err := s.SQL.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", s.where, err)
	}
	defer c.Close()
	var cfg *pgx.ConnConfig
	err = c.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("unexpected driver connection %T", dc)
		}
		cfg = sc.Conn().Config() // a copy
		// pgx set it to buffer that connection's notifications; a new
		// connection must buffer its own.
		cfg.OnNotification = nil
		return nil
	})
	return cfg, err
}

// conns hands out connections of their own (outside the pool), keeping
// up to maxIdle for reuse and at most maxOpen open (0: no bound).
type conns struct {
	db      *DB
	maxIdle int
	open    chan struct{} // one token per open connection; nil: unbounded

	mu   sync.Mutex
	cfg  *pgx.ConnConfig
	idle []*pgx.Conn
}

func newConns(db *DB, maxIdle, maxOpen int) *conns {
	c := &conns{db: db, maxIdle: maxIdle}
	if maxOpen > 0 {
		c.open = make(chan struct{}, maxOpen)
	}
	return c
}

// get returns an idle connection or dials one.
func (c *conns) get(ctx context.Context) (*pgx.Conn, error) {
	c.mu.Lock()
	for len(c.idle) > 0 {
		conn := c.idle[len(c.idle)-1]
		c.idle = c.idle[:len(c.idle)-1]
		if !conn.IsClosed() {
			c.mu.Unlock()
			return conn, nil
		}
		c.release()
	}
	cfg := c.cfg
	c.mu.Unlock()
	if c.open != nil {
		select {
		case c.open <- struct{}{}:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	if cfg == nil {
		var err error
		if cfg, err = c.db.dialConfig(ctx); err != nil {
			c.release()
			return nil, err
		}
		c.mu.Lock()
		c.cfg = cfg
		c.mu.Unlock()
	}
	conn, err := pgx.ConnectConfig(ctx, cfg.Copy())
	if err != nil {
		c.release()
		return nil, fmt.Errorf("connect to %s: %w", c.db.where, err)
	}
	return conn, nil
}

// put gives back a healthy connection that holds no lock.
func (c *conns) put(conn *pgx.Conn) {
	if conn.IsClosed() {
		c.release()
		return
	}
	c.mu.Lock()
	if len(c.idle) < c.maxIdle {
		c.idle = append(c.idle, conn)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.discard(conn)
}

// discard closes conn; whatever it held (session locks) goes with it.
func (c *conns) discard(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn.Close(ctx)
	c.release()
}

func (c *conns) release() {
	if c.open != nil {
		<-c.open
	}
}

// Close closes the idle connections.
func (c *conns) Close() {
	c.mu.Lock()
	idle := c.idle
	c.idle = nil
	c.mu.Unlock()
	for _, conn := range idle {
		c.discard(conn)
	}
}

// Notifier carries short keys (build ids) between every process sharing
// a PostgreSQL database, through NOTIFY on one channel. Delivery is a
// wake, not data: receivers re-read the database, so a wake may be
// coalesced or spurious, and after a receiver's connection was lost, Run
// calls its all function once, because wakes may have been missed then.
type Notifier struct {
	db      *DB
	channel string
	// node tags this process's notifications, so Run skips its own: the
	// publisher woke its local readers already.
	node string
	log  *slog.Logger

	mu      sync.Mutex
	pending map[string]struct{}
	kick    chan struct{}
	// listening is closed once Run's first LISTEN is in place.
	listening     chan struct{}
	listeningOnce sync.Once
}

// NewNotifier returns a notifier on channel; Run starts its delivery.
func (s *DB) NewNotifier(channel string, log *slog.Logger) *Notifier {
	if log == nil {
		log = slog.Default()
	}
	var id [8]byte
	crand.Read(id[:])
	return &Notifier{db: s, channel: channel, node: hex.EncodeToString(id[:]), log: log,
		pending: map[string]struct{}{}, kick: make(chan struct{}, 1), listening: make(chan struct{})}
}

// Notify queues a notification of key to the other processes and
// returns at once; while one is being sent, further keys are collected
// and sent together, each once.
func (n *Notifier) Notify(key string) {
	n.mu.Lock()
	n.pending[key] = struct{}{}
	n.mu.Unlock()
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// Listening is closed once Run listens; wakes notified by other
// processes before then reach this one only as Run's first all call.
func (n *Notifier) Listening() <-chan struct{} { return n.listening }

// Run sends queued notifications and delivers other processes' ones to
// one (a key) until ctx ends. It calls all whenever it (re)starts
// listening: notifications sent while it was not listening are lost.
// Lost connections are reopened with backoff.
func (n *Notifier) Run(ctx context.Context, one func(key string), all func()) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.send(ctx)
	}()
	n.listen(ctx, one, all)
	wg.Wait()
}

// backoff is a jittered doubling delay between tries, up to max.
type backoff struct{ next, max time.Duration }

func (b *backoff) wait(ctx context.Context) bool {
	d := b.next/2 + rand.N(b.next/2+1)
	b.next = min(2*b.next, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (n *Notifier) listen(ctx context.Context, one func(string), all func()) {
	b := backoff{next: 50 * time.Millisecond, max: 5 * time.Second}
	for ctx.Err() == nil {
		err := n.listenOnce(ctx, one, all, &b)
		if ctx.Err() != nil {
			return
		}
		n.log.Warn("event notifications: connection lost; reconnecting", "channel", n.channel, "err", err)
		if !b.wait(ctx) {
			return
		}
	}
}

// listenOnce listens on one connection until it fails or ctx ends.
func (n *Notifier) listenOnce(ctx context.Context, one func(string), all func(), b *backoff) error {
	cfg, err := n.db.dialConfig(ctx)
	if err != nil {
		return err
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		conn.Close(c)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{n.channel}.Sanitize()); err != nil {
		return err
	}
	n.listeningOnce.Do(func() { close(n.listening) })
	*b = backoff{next: 50 * time.Millisecond, max: 5 * time.Second}
	all() // whatever was notified while nobody listened
	for {
		msg, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		node, key, ok := strings.Cut(msg.Payload, " ")
		if ok && node != n.node {
			one(key)
		}
	}
}

// send sends queued keys, one statement per batch, on a connection of
// its own, retrying a failed batch.
func (n *Notifier) send(ctx context.Context) {
	c := newConns(n.db, 1, 1)
	defer c.Close()
	b := backoff{next: 50 * time.Millisecond, max: 5 * time.Second}
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
		}
		for {
			n.mu.Lock()
			keys := make([]string, 0, len(n.pending))
			for k := range n.pending {
				keys = append(keys, n.node+" "+k)
			}
			clear(n.pending)
			n.mu.Unlock()
			if len(keys) == 0 {
				break
			}
			if err := n.sendBatch(ctx, c, keys); err != nil {
				if ctx.Err() != nil {
					return
				}
				n.log.Warn("event notifications: send failed; retrying", "channel", n.channel, "err", err)
				n.mu.Lock()
				for _, k := range keys {
					n.pending[strings.TrimPrefix(k, n.node+" ")] = struct{}{}
				}
				n.mu.Unlock()
				if !b.wait(ctx) {
					return
				}
				continue
			}
			b = backoff{next: 50 * time.Millisecond, max: 5 * time.Second}
		}
	}
}

func (n *Notifier) sendBatch(ctx context.Context, c *conns, payloads []string) error {
	conn, err := c.get(ctx)
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, `SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p`, n.channel, payloads)
	if err != nil {
		c.discard(conn)
		return err
	}
	c.put(conn)
	return nil
}
