package egress

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---- helpers ----------------------------------------------------------

// hosts is a resolver backed by a fixed table, like /etc/hosts; it records
// every name it was asked for.
type hosts struct {
	mu    sync.Mutex
	table map[string][]string
	asked []string
}

func (h *hosts) resolve(_ context.Context, name string) ([]netip.Addr, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.asked = append(h.asked, name)
	var out []netip.Addr
	for _, s := range h.table[name] {
		out = append(out, netip.MustParseAddr(s))
	}
	if len(out) == 0 {
		return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
	}
	return out, nil
}

func (h *hosts) askedFor() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.asked...)
}

type deniedCall struct {
	host   string
	port   int
	reason string
}

type deniedLog struct {
	mu    sync.Mutex
	calls []deniedCall
}

func (d *deniedLog) record(host string, port int, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, deniedCall{host, port, reason})
}

func (d *deniedLog) all() []deniedCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]deniedCall(nil), d.calls...)
}

// dialLog wraps a real dialer, recording every address the proxy dialed.
// With redirect set it connects there instead, which lets names resolve
// to public addresses (so wildcard rules apply) while the test server
// stays on loopback.
type dialLog struct {
	mu       sync.Mutex
	addrs    []string
	redirect string
}

func (d *dialLog) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.addrs = append(d.addrs, addr)
	to := addr
	if d.redirect != "" {
		to = d.redirect
	}
	d.mu.Unlock()
	var nd net.Dialer
	return nd.DialContext(ctx, network, to)
}

func (d *dialLog) dialed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.addrs...)
}

// startProxy serves cfg on a loopback listener until the test ends.
func startProxy(t *testing.T, cfg Config) *url.URL {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.ListenAndServe(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("ListenAndServe: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("ListenAndServe did not return after its ctx ended")
		}
	})
	return &url.URL{Scheme: "http", Host: ln.Addr().String()}
}

// testLog sends the proxy's log to the test's output.
type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func proxyClient(proxy *url.URL, tlsConf *tls.Config) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			Proxy:           http.ProxyURL(proxy),
			TLSClientConfig: tlsConf,
		},
		Timeout: 30 * time.Second,
	}
}

func portOf(t *testing.T, rawURL string) int {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// echo answers with what it saw of the request, as one line per field.
func echo(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	fmt.Fprintf(w, "method=%s\nuri=%s\nhost=%s\nkeep=%s\nhop=%s\nproxy-auth=%s\nforwarded-for=%s\ntls=%v\nbody=%s\n",
		r.Method, r.RequestURI, r.Host, r.Header.Get("X-Keep"), r.Header.Get("X-Hop"),
		r.Header.Get("Proxy-Authorization"), r.Header.Get("X-Forwarded-For"), r.TLS != nil, body)
}

func get(t *testing.T, c *http.Client, rawURL string) (int, string) {
	t.Helper()
	resp, err := c.Get(rawURL)
	if err != nil {
		t.Fatalf("GET %s: %v", rawURL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", rawURL, err)
	}
	return resp.StatusCode, string(b)
}

// rawConnect sends a CONNECT by hand and reads the proxy's answer; the
// connection is left open for the tunnel.
func rawConnect(t *testing.T, c net.Conn, target string) (*http.Response, *bufio.Reader, string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	var body string
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		body = string(b)
	}
	c.SetDeadline(time.Time{})
	return resp, br, body
}

func dialProxy(t *testing.T, proxy *url.URL) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", proxy.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// tcpEcho echoes every connection back until the client half-closes;
// closed gets one value per connection that ended.
func tcpEcho(t *testing.T) (port int, closed <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { ch <- struct{}{} }()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, ch
}

func waitFor[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %s waiting for %s", d, what)
		panic("unreachable")
	}
}

// readEnds reads from c until it fails and reports when that happened.
func readEnds(c io.Reader) <-chan error {
	ch := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, c)
		if err == nil {
			err = io.EOF
		}
		ch <- err
	}()
	return ch
}

// ---- forwarding and tunnels ------------------------------------------

func TestForwardsPlainHTTPToAnAllowedNameAndKeepsConnectionsAlive(t *testing.T) {
	var remotes sync.Map // RemoteAddr → requests seen on that upstream conn
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := remotes.LoadOrStore(r.RemoteAddr, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		echo(w, r)
	}))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	denied := &deniedLog{}
	proxy := startProxy(t, Config{
		Allowed:      []string{"app.test"},
		Ports:        []int{port},
		AllowPrivate: true,
		Resolve:      (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}}}).resolve,
		OnDenied:     denied.record,
	})
	proxy.User = url.UserPassword("u", "proxy-pass")
	c := proxyClient(proxy, nil)

	var reused []bool
	for i := range 2 {
		req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://app.test:%d/hello?x=%d", port, i), strings.NewReader("payload"))
		req.Header.Set("X-Keep", "yes")
		req.Header.Set("X-Hop", "drop me")
		req.Header.Set("Connection", "X-Hop")
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) { reused = append(reused, info.Reused) },
		}))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		for _, want := range []string{
			"method=POST\n",
			fmt.Sprintf("uri=/hello?x=%d\n", i),
			fmt.Sprintf("host=app.test:%d\n", port),
			"keep=yes\n",
			"hop=\n",           // named in Connection: hop-by-hop
			"proxy-auth=\n",    // meant for the proxy, never forwarded
			"forwarded-for=\n", // the guest's address is nobody's business
			"body=payload\n",
		} {
			if !strings.Contains(string(body), want) {
				t.Errorf("request %d: upstream saw\n%s\nwant it to contain %q", i, body, want)
			}
		}
	}
	if len(reused) != 2 || !reused[1] {
		t.Errorf("client connection to the proxy reused: %v, want the second request on the first connection", reused)
	}
	conns := 0
	remotes.Range(func(_, n any) bool {
		conns++
		if got := n.(*atomic.Int32).Load(); got != 2 {
			t.Errorf("upstream connection carried %d requests, want both", got)
		}
		return true
	})
	if conns != 1 {
		t.Errorf("upstream saw %d connections for two requests on one kept-alive client connection", conns)
	}
	if d := denied.all(); len(d) != 0 {
		t.Errorf("OnDenied called for allowed requests: %v", d)
	}

	// The absolute URI picks the upstream; a Host header naming another
	// host changes nothing (RFC 9112 3.2.2), in particular it cannot
	// smuggle a request to a denied name.
	conn := dialProxy(t, proxy)
	fmt.Fprintf(conn, "GET http://app.test:%d/lying HTTP/1.1\r\nHost: evil.test\r\n\r\n", port)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(body), fmt.Sprintf("host=app.test:%d\n", port)) {
		t.Errorf("lying Host header: %s\n%s", resp.Status, body)
	}
}

func tlsConfigFor(srv *httptest.Server) *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	// httptest's certificate is for example.com; verifying against it
	// proves the TLS session is end to end with the real server.
	return &tls.Config{RootCAs: pool, ServerName: "example.com"}
}

func TestConnectTunnelsTLSToAnAllowedName(t *testing.T) {
	upstream := httptest.NewTLSServer(http.HandlerFunc(echo))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	proxy := startProxy(t, Config{
		Allowed:      []string{"secure.test"},
		Ports:        []int{port},
		AllowPrivate: true,
		Resolve:      (&hosts{table: map[string][]string{"secure.test": {"127.0.0.1"}}}).resolve,
	})
	c := proxyClient(proxy, tlsConfigFor(upstream))
	for range 2 {
		code, body := get(t, c, fmt.Sprintf("https://secure.test:%d/over-tls", port))
		if code != 200 || !strings.Contains(body, "tls=true") || !strings.Contains(body, "uri=/over-tls") {
			t.Fatalf("status %d body:\n%s", code, body)
		}
	}
}

func TestDeniedNameGets403AndOnDeniedBeforeAnyLookupOrDial(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(echo))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	res := &hosts{table: map[string][]string{"app.test": {"127.0.0.1"}, "evil.test": {"127.0.0.1"}}}
	dials := &dialLog{}
	denied := &deniedLog{}
	proxy := startProxy(t, Config{
		Allowed: []string{"app.test"}, Ports: []int{port}, AllowPrivate: true,
		Resolve: res.resolve, Dial: dials.dial, OnDenied: denied.record,
	})

	code, body := get(t, proxyClient(proxy, nil), fmt.Sprintf("http://Evil.Test.:%d/x", port))
	if code != http.StatusForbidden {
		t.Fatalf("forward to a denied name: status %d, body %q", code, body)
	}
	if !strings.Contains(body, "evil.test") || !strings.Contains(body, "--allow-domain evil.test") {
		t.Errorf("403 body %q does not name the domain and --allow-domain", body)
	}

	resp, _, body := rawConnect(t, dialProxy(t, proxy), "evil.test:443")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "--allow-domain evil.test") {
		t.Errorf("CONNECT to a denied name: %s %q", resp.Status, body)
	}

	got := denied.all()
	if len(got) != 2 || got[0].host != "evil.test" || got[0].port != port || got[1].host != "evil.test" || got[1].port != 443 {
		t.Fatalf("OnDenied calls = %+v, want evil.test:%d then evil.test:443", got, port)
	}
	if !strings.Contains(got[0].reason, "not in this build's allowed domains") {
		t.Errorf("reason = %q", got[0].reason)
	}
	if a := res.askedFor(); len(a) != 0 {
		t.Errorf("denied names were looked up: %v", a)
	}
	if d := dials.dialed(); len(d) != 0 {
		t.Errorf("denied requests dialed %v", d)
	}
}

func TestDeniedCONNECTThroughGoClientFails(t *testing.T) {
	proxy := startProxy(t, Config{Allowed: []string{"app.test"}})
	_, err := proxyClient(proxy, nil).Get("https://evil.test/")
	if err == nil || !strings.Contains(err.Error(), "Forbidden") {
		t.Fatalf("https GET of a denied name: err = %v, want the proxy's 403 Forbidden", err)
	}
}

func TestWildcardMatchesSubdomainsButNotTheDomainItself(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(echo))
	defer upstream.Close()
	// Every name resolves to a public address, so wildcard matches may
	// reach it; the dialer stands in for the internet and connects to the
	// test server.
	dials := &dialLog{redirect: upstream.Listener.Addr().String()}
	resolveAll := func(context.Context, string) ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("198.51.100.7")}, nil
	}
	proxy := startProxy(t, Config{
		Allowed: []string{"*.suffix.test", ".dot.test", "Exact.Test."},
		Resolve: resolveAll, Dial: dials.dial,
	})
	c := proxyClient(proxy, nil)
	for host, want := range map[string]int{
		"a.suffix.test":      200,
		"a.b.c.suffix.test":  200,
		"A.SUFFIX.TEST.":     200,
		"suffix.test":        403, // the wildcard does not cover the domain itself
		"xsuffix.test":       403,
		"suffix.test.evil":   403,
		"x.dot.test":         200,
		"dot.test":           403,
		"exact.test":         200,
		"EXACT.test.":        200,
		"sub.exact.test":     403, // an exact entry does not cover subdomains
		"exact.test.example": 403,
	} {
		code, body := get(t, c, "http://"+host+"/")
		if code != want {
			t.Errorf("%s: status %d, want %d (%q)", host, code, want, body)
		}
	}
	for _, a := range dials.dialed() {
		if a != "198.51.100.7:80" {
			t.Errorf("dialed %s, want only the checked address 198.51.100.7:80", a)
		}
	}
}

func TestCheckNames(t *testing.T) {
	p, err := New(Config{Allowed: []string{"*.example.com", "exact.org", "10.0.0.5", "[2001:db8::1]"}, Ports: []int{8443}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host  string
		port  int
		ok    bool
		exact bool
	}{
		{"a.example.com", 443, true, false},
		{"a.b.example.com", 80, true, false},
		{"example.com", 443, false, false},
		{"badexample.com", 443, false, false},
		{"EXACT.ORG.", 443, true, true},
		{"exact.org", 8443, true, true},
		{"exact.org", 22, false, false},
		{"exact.org", 8080, false, false},
		{"10.0.0.5", 443, true, true},
		{"2001:db8::1", 443, true, true},
		{"2001:DB8:0::1", 443, true, true},
		{"::ffff:10.0.0.5", 443, true, true},
		{"10.0.0.6", 443, false, false},
		{"127.0.0.1", 443, false, false},
		{"127.1", 443, false, false},      // inet_aton would read it as 127.0.0.1
		{"2130706433", 443, false, false}, // so would this
		{"x.example.com\x00", 443, false, false},
		{"a..example.com", 443, false, false},
		{"a b.example.com", 443, false, false},
		{"", 443, false, false},
	} {
		got, d := p.check(tc.host, tc.port)
		if (d == nil) != tc.ok || (tc.ok && got.exact != tc.exact) {
			t.Errorf("check(%q, %d) = %+v, %v; want ok=%v exact=%v", tc.host, tc.port, got, d, tc.ok, tc.exact)
		}
	}
}

func TestPublicAddresses(t *testing.T) {
	for s, want := range map[string]bool{
		"198.51.100.7": true, "8.8.8.8": true, "2606:4700::1111": true,
		"127.0.0.1": false, "127.9.9.9": false, "::1": false, "0.0.0.0": false, "::": false,
		"10.1.2.3": false, "172.16.0.1": false, "192.168.1.1": false, "100.64.0.1": false,
		"169.254.169.254": false, "fe80::1": false, "fd00::1": false, "224.0.0.1": false,
		"255.255.255.255": false, "::ffff:127.0.0.1": false, "64:ff9b::7f00:1": false,
		"64:ff9b::808:808": true, "2002:7f00:1::": false,
	} {
		if got := public(netip.MustParseAddr(s)); got != want {
			t.Errorf("public(%s) = %v, want %v", s, got, want)
		}
	}
}

func TestIPLiteralsNeedAnExactEntry(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(echo))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	denied := &deniedLog{}
	proxy := startProxy(t, Config{Allowed: []string{"app.test", "*.test"}, Ports: []int{port}, AllowPrivate: true, OnDenied: denied.record})
	code, body := get(t, proxyClient(proxy, nil), fmt.Sprintf("http://127.0.0.1:%d/", port))
	if code != 403 || !strings.Contains(body, "IP addresses") {
		t.Errorf("IP literal: status %d %q", code, body)
	}
	resp, _, body := rawConnect(t, dialProxy(t, proxy), "[::1]:443")
	if resp.StatusCode != 403 {
		t.Errorf("CONNECT [::1]:443: %s %q", resp.Status, body)
	}
	if d := denied.all(); len(d) != 2 || d[0].host != "127.0.0.1" || d[1].host != "::1" {
		t.Errorf("OnDenied = %+v", d)
	}

	// Listed exactly, with AllowPrivate, the literal works.
	listed := startProxy(t, Config{Allowed: []string{"127.0.0.1"}, Ports: []int{port}, AllowPrivate: true})
	if code, body := get(t, proxyClient(listed, nil), fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 200 {
		t.Errorf("listed IP literal: status %d %q", code, body)
	}
	// Listed exactly but without AllowPrivate, loopback stays closed.
	noPrivate := startProxy(t, Config{Allowed: []string{"127.0.0.1"}, Ports: []int{port}})
	if code, body := get(t, proxyClient(noPrivate, nil), fmt.Sprintf("http://127.0.0.1:%d/", port)); code != 403 {
		t.Errorf("listed loopback literal without AllowPrivate: status %d %q", code, body)
	}
}

func TestAllowedNameResolvingToPrivateAddressesIsDenied(t *testing.T) {
	var hits atomic.Int32
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		echo(w, r)
	}))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	res := &hosts{table: map[string][]string{
		"rebind.test":  {"127.0.0.1"},
		"inside.test":  {"10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1", "0.0.0.0", "fd00::1"},
		"a.wild.test":  {"127.0.0.1"},
		"mixed.test":   {"127.0.0.1", "198.51.100.7"},
		"private.test": {"127.0.0.1"},
		"b.wildp.test": {"127.0.0.1"},
	}}
	denied := &deniedLog{}
	strict := startProxy(t, Config{
		Allowed: []string{"rebind.test", "inside.test", "*.wild.test"},
		Ports:   []int{port}, Resolve: res.resolve, OnDenied: denied.record,
	})
	c := proxyClient(strict, nil)
	for _, host := range []string{"rebind.test", "inside.test", "a.wild.test"} {
		code, body := get(t, c, fmt.Sprintf("http://%s:%d/", host, port))
		if code != 403 || !strings.Contains(body, "non-public") {
			t.Errorf("%s: status %d %q, want 403 for non-public addresses", host, code, body)
		}
		resp, _, body := rawConnect(t, dialProxy(t, strict), fmt.Sprintf("%s:%d", host, port))
		if resp.StatusCode != 403 {
			t.Errorf("CONNECT %s: %s %q", host, resp.Status, body)
		}
	}
	if d := denied.all(); len(d) != 6 || !strings.Contains(d[0].reason, "127.0.0.1") {
		t.Errorf("OnDenied = %+v, want 6 calls naming the addresses", d)
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("upstream on loopback was reached %d times", n)
	}

	// AllowPrivate opens loopback to exactly listed names only.
	lax := startProxy(t, Config{
		Allowed: []string{"private.test", "*.wildp.test"}, Ports: []int{port}, AllowPrivate: true, Resolve: res.resolve,
	})
	c = proxyClient(lax, nil)
	if code, body := get(t, c, fmt.Sprintf("http://private.test:%d/", port)); code != 200 {
		t.Errorf("exactly listed name with AllowPrivate: %d %q", code, body)
	}
	if code, body := get(t, c, fmt.Sprintf("http://b.wildp.test:%d/", port)); code != 403 {
		t.Errorf("wildcard name with AllowPrivate reached loopback: %d %q", code, body)
	}

	// A mixed answer uses only the public address.
	dials := &dialLog{redirect: upstream.Listener.Addr().String()}
	mixed := startProxy(t, Config{Allowed: []string{"mixed.test"}, Ports: []int{port}, Resolve: res.resolve, Dial: dials.dial})
	if code, body := get(t, proxyClient(mixed, nil), fmt.Sprintf("http://mixed.test:%d/", port)); code != 200 {
		t.Errorf("mixed answer: %d %q", code, body)
	}
	if d := dials.dialed(); len(d) != 1 || d[0] != fmt.Sprintf("198.51.100.7:%d", port) {
		t.Errorf("mixed answer dialed %v, want only the public address", d)
	}
}

func TestSystemResolverReachesLocalhostOnlyWhenListedWithAllowPrivate(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(echo))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	// No Resolve: the system resolver answers from /etc/hosts.
	open := startProxy(t, Config{Allowed: []string{"localhost"}, Ports: []int{port}, AllowPrivate: true})
	if code, body := get(t, proxyClient(open, nil), fmt.Sprintf("http://localhost:%d/", port)); code != 200 {
		t.Errorf("localhost listed with AllowPrivate: %d %q", code, body)
	}
	closed := startProxy(t, Config{Allowed: []string{"localhost"}, Ports: []int{port}})
	if code, body := get(t, proxyClient(closed, nil), fmt.Sprintf("http://localhost:%d/", port)); code != 403 || !strings.Contains(body, "non-public") {
		t.Errorf("localhost without AllowPrivate: %d %q", code, body)
	}
}

func TestPortsOutsideTheListAreDenied(t *testing.T) {
	denied := &deniedLog{}
	res := &hosts{table: map[string][]string{"app.test": {"198.51.100.7"}}}
	proxy := startProxy(t, Config{Allowed: []string{"app.test"}, Ports: []int{8443}, Resolve: res.resolve, OnDenied: denied.record})
	resp, _, body := rawConnect(t, dialProxy(t, proxy), "app.test:22")
	if resp.StatusCode != 403 || !strings.Contains(body, "port 22") || !strings.Contains(body, "80, 443, 8443") {
		t.Errorf("CONNECT app.test:22: %s %q", resp.Status, body)
	}
	code, body := get(t, proxyClient(proxy, nil), "http://app.test:8080/")
	if code != 403 || !strings.Contains(body, "port 8080") {
		t.Errorf("GET app.test:8080: %d %q", code, body)
	}
	if d := denied.all(); len(d) != 2 || d[0].port != 22 || d[1].port != 8080 {
		t.Errorf("OnDenied = %+v", d)
	}
	if a := res.askedFor(); len(a) != 0 {
		t.Errorf("looked up %v for closed ports", a)
	}
}

func TestRequestsThatAreNotProxyRequestsGet400(t *testing.T) {
	proxy := startProxy(t, Config{Allowed: []string{"app.test"}})
	c := dialProxy(t, proxy)
	fmt.Fprintf(c, "GET /local HTTP/1.1\r\nHost: app.test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 400 || !strings.Contains(string(body), "HTTP_PROXY") {
		t.Errorf("origin-form request: %s %q", resp.Status, body)
	}

	c = dialProxy(t, proxy)
	fmt.Fprintf(c, "GET https://app.test/ HTTP/1.1\r\nHost: app.test\r\n\r\n")
	resp, err = http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != 400 || !strings.Contains(string(body), "CONNECT") {
		t.Errorf("https absolute URI: %s %q", resp.Status, body)
	}
}

// ---- streaming -------------------------------------------------------

const chunk = 64 << 10

func TestBodiesStreamBothWaysWithoutWaitingForTheEnd(t *testing.T) {
	gotFirstUp := make(chan struct{})
	clientGotFirst := make(chan struct{})
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/up":
			if _, err := io.ReadFull(r.Body, make([]byte, chunk)); err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			close(gotFirstUp)
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%d", chunk+n)
		case "/down":
			// A small first write with a known length, like a progress
			// line: it must not wait in a buffer for more to come.
			w.Header().Set("Content-Length", strconv.Itoa(100+chunk))
			w.Write(bytes.Repeat([]byte("d"), 100))
			w.(http.Flusher).Flush()
			select {
			case <-clientGotFirst:
			case <-time.After(10 * time.Second):
				return // the client never saw the first chunk: cut short
			}
			w.Write(bytes.Repeat([]byte("e"), chunk))
		}
	}))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	proxy := startProxy(t, Config{
		Allowed: []string{"app.test"}, Ports: []int{port}, AllowPrivate: true,
		Resolve: (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}}}).resolve,
	})
	c := proxyClient(proxy, nil)

	// Upload: the rest of the body is written only after the server has
	// read the first chunk, which cannot happen if the proxy waits for
	// the whole body.
	pr, pw := io.Pipe()
	writeErr := make(chan error, 1)
	go func() {
		if _, err := pw.Write(bytes.Repeat([]byte("u"), chunk)); err != nil {
			writeErr <- err
			return
		}
		select {
		case <-gotFirstUp:
		case <-time.After(10 * time.Second):
			pw.CloseWithError(errors.New("upstream never saw the first chunk"))
			writeErr <- errors.New("upstream did not get the first chunk of the request body before the rest was sent: the proxy holds request bodies back")
			return
		}
		_, err := pw.Write(bytes.Repeat([]byte("v"), 10*chunk))
		pw.Close()
		writeErr <- err
	}()
	resp, err := c.Post(fmt.Sprintf("http://app.test:%d/up", port), "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if string(body) != strconv.Itoa(11*chunk) {
		t.Errorf("upstream received %s bytes, want %d", body, 11*chunk)
	}

	// Download: the server sends the rest only once the client got the
	// first chunk.
	resp, err = c.Get(fmt.Sprintf("http://app.test:%d/down", port))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, 100)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatalf("read first chunk: %v", err)
	}
	close(clientGotFirst)
	rest, _ := io.ReadAll(resp.Body)
	if len(rest) != chunk || rest[0] != 'e' {
		t.Errorf("got %d bytes after the first chunk, want %d: the response was not streamed", len(rest), chunk)
	}
}

// pattern is an endless reader of non-zero bytes that allocates nothing.
type pattern struct{}

func (pattern) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = byte(i%251 + 1)
	}
	return len(b), nil
}

func TestLargeBodiesPassWithLittleMemory(t *testing.T) {
	const size = 256 << 20
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%d", n)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(size))
		io.Copy(w, io.LimitReader(pattern{}, size))
	}))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	proxy := startProxy(t, Config{
		Allowed: []string{"app.test"}, Ports: []int{port}, AllowPrivate: true,
		Resolve: (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}}}).resolve,
	})
	c := proxyClient(proxy, nil)
	u := fmt.Sprintf("http://app.test:%d/big", port)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()

	resp, err := c.Post(u, "application/octet-stream", io.LimitReader(pattern{}, size))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != strconv.Itoa(size) {
		t.Fatalf("upload: upstream got %s bytes, want %d", body, size)
	}
	resp, err = c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != size {
		t.Fatalf("download: got %d bytes (%v), want %d", n, err, size)
	}

	runtime.ReadMemStats(&after)
	// Client, proxy and server all run in this process: 512 MiB moved
	// through it, and everything all three allocated stays far below that.
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("moved %d MiB each way in %s; allocated %d KiB in total", size>>20, time.Since(start).Round(time.Millisecond), alloc>>10)
	if alloc > 32<<20 {
		t.Errorf("allocated %d MiB to move %d MiB each way: bodies are being buffered", alloc>>20, size>>20)
	}
}

// ---- timeouts and cancellation ---------------------------------------

func TestCancelClosesOpenTunnels(t *testing.T) {
	echoPort, upstreamClosed := tcpEcho(t)
	p, err := New(Config{
		Allowed: []string{"echo.test"}, Ports: []int{echoPort}, AllowPrivate: true,
		Resolve: (&hosts{table: map[string][]string{"echo.test": {"127.0.0.1"}}}).resolve,
	})
	if err != nil {
		t.Fatal(err)
	}
	target := fmt.Sprintf("echo.test:%d", echoPort)
	ping := func(c net.Conn, br *bufio.Reader) {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		defer c.SetDeadline(time.Time{})
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			t.Fatal(err)
		}
		line, err := br.ReadString('\n')
		if err != nil || line != "ping\n" {
			t.Fatalf("echo through the tunnel: %q, %v", line, err)
		}
	}

	t.Run("ListenAndServe", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		served := make(chan error, 1)
		go func() { served <- p.ListenAndServe(ctx, ln) }()
		c := dialProxy(t, &url.URL{Host: ln.Addr().String()})
		resp, br, body := rawConnect(t, c, target)
		if resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %s %q", resp.Status, body)
		}
		ping(c, br)
		ended := readEnds(br)
		cancel()
		waitFor(t, ended, 5*time.Second, "the client side of the tunnel to close")
		waitFor(t, upstreamClosed, 5*time.Second, "the upstream side of the tunnel to close")
		if err := waitFor(t, served, 5*time.Second, "ListenAndServe to return"); err != nil {
			t.Errorf("ListenAndServe after cancel: %v", err)
		}
		if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
			t.Error("the proxy still accepts connections after its ctx ended")
		}
	})

	t.Run("Dialer", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		dial := p.Dialer(ctx)
		c, err := dial(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		resp, br, body := rawConnect(t, c, target)
		if resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %s %q", resp.Status, body)
		}
		ping(c, br)
		ended := readEnds(br)
		cancel()
		waitFor(t, ended, 5*time.Second, "the client side of the tunnel to close")
		waitFor(t, upstreamClosed, 5*time.Second, "the upstream side of the tunnel to close")
		if _, err := dial(context.Background()); err == nil {
			t.Error("the Dialer of a stopped proxy still hands out connections")
		}
	})
}

func TestServeConnReturnsAndClosesOnCancelMidRequest(t *testing.T) {
	stuck := make(chan struct{})
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(stuck)
		<-r.Context().Done()
	}))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	p, err := New(Config{
		Allowed: []string{"app.test"}, Ports: []int{port}, AllowPrivate: true,
		Resolve: (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}}}).resolve,
	})
	if err != nil {
		t.Fatal(err)
	}
	client, server, err := connPair()
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithCancel(context.Background())
	returned := make(chan struct{})
	go func() { p.ServeConn(ctx, server); close(returned) }()
	fmt.Fprintf(client, "GET http://app.test:%d/ HTTP/1.1\r\nHost: app.test\r\n\r\n", port)
	waitFor(t, stuck, 5*time.Second, "the request to reach upstream")
	ended := readEnds(client)
	cancel()
	waitFor(t, returned, 5*time.Second, "ServeConn to return")
	waitFor(t, ended, 5*time.Second, "the client connection to close")
}

func TestIdleTunnelIsClosedButABusyOneIsNot(t *testing.T) {
	echoPort, upstreamClosed := tcpEcho(t)
	const idle = 300 * time.Millisecond
	proxy := startProxy(t, Config{
		Allowed: []string{"echo.test"}, Ports: []int{echoPort}, AllowPrivate: true, IdleTimeout: idle,
		Resolve: (&hosts{table: map[string][]string{"echo.test": {"127.0.0.1"}}}).resolve,
	})
	c := dialProxy(t, proxy)
	resp, br, body := rawConnect(t, c, fmt.Sprintf("echo.test:%d", echoPort))
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %s %q", resp.Status, body)
	}
	// Traffic every 100ms for 4 idle periods keeps the tunnel open.
	var silent time.Time
	for i := range 12 {
		time.Sleep(100 * time.Millisecond)
		fmt.Fprintf(c, "tick %d\n", i)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if line, err := br.ReadString('\n'); err != nil || line != fmt.Sprintf("tick %d\n", i) {
			t.Fatalf("tick %d: %q %v: a busy tunnel was closed", i, line, err)
		}
		silent = time.Now()
	}
	c.SetReadDeadline(time.Time{})
	ended := readEnds(br)
	waitFor(t, ended, 5*time.Second, "the idle tunnel to close")
	if d := time.Since(silent); d < idle {
		t.Errorf("tunnel closed after %s of silence, before the %s idle timeout", d, idle)
	}
	waitFor(t, upstreamClosed, 5*time.Second, "the upstream side to close")
}

func TestConnectTimeoutGives502(t *testing.T) {
	blackhole := func(ctx context.Context, _, _ string) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	proxy := startProxy(t, Config{
		Allowed: []string{"slow.test"}, ConnectTimeout: 300 * time.Millisecond, Dial: blackhole,
		Resolve: (&hosts{table: map[string][]string{"slow.test": {"198.51.100.7", "198.51.100.8"}}}).resolve,
	})
	start := time.Now()
	code, body := get(t, proxyClient(proxy, nil), "http://slow.test/")
	if code != http.StatusBadGateway || !strings.Contains(body, "timed out") {
		t.Errorf("status %d %q, want 502 saying it timed out", code, body)
	}
	resp, _, body := rawConnect(t, dialProxy(t, proxy), "slow.test:443")
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(body, "slow.test:443") {
		t.Errorf("CONNECT: %s %q", resp.Status, body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("two connect attempts took %s with a 300ms connect timeout", d)
	}
}

// ---- logs, config ----------------------------------------------------

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestLogsNeverCarryBodiesCredentialsOrURLs(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(echo))
	defer upstream.Close()
	port := portOf(t, upstream.URL)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := closed.Addr().(*net.TCPAddr).Port
	closed.Close() // nothing listens here: connection refused
	logs := &syncBuffer{}
	proxy := startProxy(t, Config{
		Allowed: []string{"app.test", "down.test"}, Ports: []int{port, closedPort}, AllowPrivate: true,
		Resolve: (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}, "down.test": {"127.0.0.1"}}}).resolve,
		Logger:  slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	proxy.User = url.UserPassword("u", "SECRET-proxy-pass")
	c := proxyClient(proxy, nil)
	for _, target := range []string{
		fmt.Sprintf("http://app.test:%d/path-SECRET-path?sig=SECRET-query", port),
		fmt.Sprintf("http://down.test:%d/path-SECRET-path?sig=SECRET-query", closedPort),
		fmt.Sprintf("http://evil.test:%d/path-SECRET-path?sig=SECRET-query", port),
	} {
		req, _ := http.NewRequest(http.MethodPost, target, strings.NewReader("SECRET-body"))
		req.Header.Set("Authorization", "Bearer SECRET-token")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	out := logs.String()
	for _, want := range []string{"egress denied", "egress upstream failed", "egress connected"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q; it is:\n%s", want, out)
		}
	}
	if strings.Contains(out, "SECRET") {
		t.Errorf("a secret reached the log:\n%s", out)
	}
}

func TestNewRejectsBadEntries(t *testing.T) {
	for entry, want := range map[string]string{
		"":                    "empty",
		"*":                   "every domain",
		"https://example.com": "without a scheme",
		"example.com:443":     "without a port",
		"foo*.example.com":    `"*" is only allowed`,
		"*.*.example.com":     `"*" is only allowed`,
		"exa mple.com":        "not a valid DNS name",
		"fe80::1%eth0":        "zone",
	} {
		_, err := New(Config{Allowed: []string{"ok.test", entry}})
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", entry)) {
			t.Errorf("New(%q): err = %v, want it to name the entry and say %q", entry, err, want)
		}
	}
	if _, err := New(Config{Ports: []int{70000}}); err == nil || !strings.Contains(err.Error(), "70000") {
		t.Errorf("port 70000: err = %v", err)
	}
}

// ---- curl ------------------------------------------------------------

func TestCurlThroughTheProxy(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed")
	}
	plain := httptest.NewServer(http.HandlerFunc(echo))
	defer plain.Close()
	secure := httptest.NewTLSServer(http.HandlerFunc(echo))
	defer secure.Close()
	plainPort, securePort := portOf(t, plain.URL), portOf(t, secure.URL)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: secure.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	denied := &deniedLog{}
	proxy := startProxy(t, Config{
		// httptest's certificate names example.com, so that is the name
		// curl asks for; the proxy resolves it to the test server.
		Allowed: []string{"app.test", "example.com"}, Ports: []int{plainPort, securePort}, AllowPrivate: true,
		Resolve:  (&hosts{table: map[string][]string{"app.test": {"127.0.0.1"}, "example.com": {"127.0.0.1"}}}).resolve,
		OnDenied: denied.record,
	})
	// Like a RUN step: the proxy comes from the environment only.
	run := func(args ...string) (string, string, error) {
		cmd := exec.Command(curl, append([]string{"-sS", "--max-time", "20"}, args...)...)
		cmd.Env = []string{
			"PATH=" + os.Getenv("PATH"),
			"http_proxy=" + proxy.String(), "HTTPS_PROXY=" + proxy.String(),
		}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		return stdout.String(), stderr.String(), err
	}

	out, stderr, err := run(fmt.Sprintf("http://app.test:%d/curl", plainPort))
	if err != nil || !strings.Contains(out, "uri=/curl") {
		t.Errorf("curl http: %v %s\n%s", err, stderr, out)
	}
	out, stderr, err = run("--cacert", ca, fmt.Sprintf("https://example.com:%d/curl-tls", securePort))
	if err != nil || !strings.Contains(out, "tls=true") {
		t.Errorf("curl https: %v %s\n%s", err, stderr, out)
	}
	out, stderr, err = run("-w", "\n%{http_code}", fmt.Sprintf("http://evil.test:%d/", plainPort))
	if err != nil || !strings.HasSuffix(out, "\n403") || !strings.Contains(out, "--allow-domain evil.test") {
		t.Errorf("curl http denied: %v %s\n%s", err, stderr, out)
	}
	_, stderr, err = run("https://evil.test/")
	if err == nil || !strings.Contains(stderr, "403") {
		t.Errorf("curl https denied: err=%v stderr=%s", err, stderr)
	}
	if d := denied.all(); len(d) != 2 || d[0].host != "evil.test" || d[1].port != 443 {
		t.Errorf("OnDenied = %+v", d)
	}
}
