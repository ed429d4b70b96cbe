package builds

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// A context URL whose host the operator allowed only by a wildcard must
// not lead the server into its own networks: this machine's own host
// name (which resolves to loopback or a private address, never a
// wildcard's intended target) is refused for an http(s) download and for
// a git fetch, and nothing is recorded. Listed by host:port, the same URL
// is fetched.
func TestWildcardContextHostsReachOnlyPublicAddresses(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Skipf("no host name: %v", err)
	}
	addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
	if err != nil || len(addrs) == 0 {
		t.Skipf("host name %q does not resolve here: %v", host, err)
	}
	for _, a := range addrs {
		if a.IsGlobalUnicast() && !a.IsPrivate() {
			t.Skipf("host name %q resolves to the public address %s", host, a)
		}
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(contextTar()) }))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	hostPort := net.JoinHostPort(host, port)

	f := newFixture(t, 1)
	f.cfg.NetworkDefault = "egress"
	f.cfg.URLContextsAllowed = []string{"*"}
	s, _ := f.service()
	p := principal("fetch")
	for _, u := range []string{"http://" + hostPort + "/ctx.tar", "http://" + hostPort + "/repo.git"} {
		before := countBuilds(t, s)
		_, err := s.Submit(context.Background(), p, s.NewUpload(), Request{ContextURL: u})
		if !errors.Is(err, errdefs.ErrForbidden) || !strings.Contains(err.Error(), "not a public internet address") {
			t.Errorf("%s with context.url_allowed *: %v, want forbidden: not a public address", u, err)
		}
		if countBuilds(t, s) != before {
			t.Errorf("%s: a refused submission recorded a build", u)
		}
	}

	s.cfg.URLContextsAllowed = []string{"*", hostPort}
	b, err := s.Submit(context.Background(), p, s.NewUpload(), Request{ContextURL: "http://" + hostPort + "/ctx.tar"})
	if err != nil {
		t.Fatalf("listed by host:port: %v", err)
	}
	if b.Options.ContextSource == "" {
		t.Errorf("the fetched build does not say where its context came from: %+v", b.Options)
	}
}
