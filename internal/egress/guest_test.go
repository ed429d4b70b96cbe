package egress

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/solve"
)

// TestThroughTheGuestTunnel runs the proxy where the vm runtime puts it:
// behind Host.Tunnels["egress"], reached from "inside the guest" by a
// client whose proxy is the tunnel's guest listen address. The channel is
// a socketpair instead of a virtio-serial port; everything else is the
// real protocol.
func TestThroughTheGuestTunnel(t *testing.T) {
	plain := httptest.NewServer(http.HandlerFunc(echo))
	defer plain.Close()
	secure := httptest.NewTLSServer(http.HandlerFunc(echo))
	defer secure.Close()
	echoPort, _ := tcpEcho(t)
	plainPort, securePort := portOf(t, plain.URL), portOf(t, secure.URL)

	denied := &deniedLog{}
	p, err := New(Config{
		Allowed: []string{"app.test", "secure.test", "echo.test"}, AllowPrivate: true,
		Ports: []int{plainPort, securePort, echoPort},
		Resolve: (&hosts{table: map[string][]string{
			"app.test": {"127.0.0.1"}, "secure.test": {"127.0.0.1"}, "echo.test": {"127.0.0.1"},
		}}).resolve,
		OnDenied: denied.record,
	})
	if err != nil {
		t.Fatal(err)
	}
	buildCtx, endBuild := context.WithCancel(context.Background())
	defer endBuild()

	hostEnd, guestEnd, err := connPair()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte("FROM scratch\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := freeAddr(t)
	job := guest.Job{
		BuildID: "egress-test", CacheDisk: "kiln-cache",
		Solve:   solve.Request{ContextDir: dir},
		Network: "egress",
		Tunnels: []guest.Tunnel{{Name: "egress", Listen: listen}},
	}
	h := &guest.Host{Tunnels: map[string]guest.Dialer{"egress": p.Dialer(buildCtx)}, CancelGrace: 2 * time.Second}
	served := make(chan error, 1)
	go func() {
		_, err := h.Serve(buildCtx, hostEnd, job, nil)
		served <- err
	}()
	s, err := guest.Accept(context.Background(), guestEnd, guest.AgentOptions{Agent: "test"})
	if err != nil {
		t.Fatal(err)
	}
	setup, err := s.Setup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := setup.Finish(solve.Result{}, nil); err != nil {
		t.Fatal(err)
	}
	task, err := s.Next(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stop, err := task.ListenTunnels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	proxy := &url.URL{Scheme: "http", Host: listen}
	c := proxyClient(proxy, tlsConfigFor(secure))
	if code, body := get(t, c, fmt.Sprintf("http://app.test:%d/via-guest", plainPort)); code != 200 || !strings.Contains(body, "uri=/via-guest") {
		t.Errorf("http through the guest tunnel: %d\n%s", code, body)
	}
	if code, body := get(t, c, fmt.Sprintf("https://secure.test:%d/via-guest-tls", securePort)); code != 200 || !strings.Contains(body, "tls=true") {
		t.Errorf("https through the guest tunnel: %d\n%s", code, body)
	}
	if code, body := get(t, c, fmt.Sprintf("http://evil.test:%d/", plainPort)); code != 403 || !strings.Contains(body, "--allow-domain evil.test") {
		t.Errorf("denied name through the guest tunnel: %d\n%s", code, body)
	}
	if d := denied.all(); len(d) != 1 || d[0].host != "evil.test" {
		t.Errorf("OnDenied = %+v", d)
	}

	// A half-close from the guest client crosses tunnel, socketpair and
	// proxy tunnel, and the answer still comes back.
	conn, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, br, body := rawConnect(t, conn, fmt.Sprintf("echo.test:%d", echoPort))
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT through the guest tunnel: %s %q", resp.Status, body)
	}
	msg := strings.Repeat("half-close ", 50000)
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatal(err)
	}
	conn.(*net.TCPConn).CloseWrite()
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(br)
	if err != nil || string(got) != msg {
		t.Errorf("echo after half-close: %d bytes (%v), want %d", len(got), err, len(msg))
	}

	// Ending the build closes what is still open through the proxy.
	open, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	resp, br, _ = rawConnect(t, open, fmt.Sprintf("echo.test:%d", echoPort))
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %s", resp.Status)
	}
	ended := readEnds(br)
	endBuild()
	waitFor(t, ended, 10*time.Second, "the open tunnel to close when the build ended")
	s.Close()
	waitFor(t, served, 40*time.Second, "Host.Serve to return")
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
