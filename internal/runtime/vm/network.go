package vm

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/egress"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// What a builder VM's RUN steps reach is decided here, per job:
//
//   - isolated: nothing but the registry tunnels.
//   - egress with allowed domains: additionally an HTTP proxy inside the
//     guest (the "egress" tunnel), served on the host by internal/egress,
//     which lets through only those domains. Steps find it through
//     HTTP_PROXY/HTTPS_PROXY, set as BuildKit's predefined proxy build
//     args: BuildKit puts them in each RUN's environment but keeps them out
//     of the image, its history and the cache key. Tools that ignore proxy
//     variables reach nothing.
//     The daemon itself uses the same proxy for ADD <url> and git
//     sources, but not for the registries it reaches through tunnels:
//     their host names are in its NO_PROXY (noProxyHosts); their
//     loopback IPs bypass any proxy anyway.
//   - egress without allowed domains: a user-mode NIC (QEMU's slirp), the
//     only case with a network card. QEMU opens the guest's connections
//     as its own sockets, so steps reach what the kiln host reaches, like
//     docker build's default bridge. Slirp maps its gateway address to the
//     host's loopback; the agent routes that address nowhere, so kiln's
//     API and registry and other services bound to the host's loopback
//     stay out of reach (the registry only through its tunnel).
//
// isolated and allow-listed builds have no network card at all.

// egressListen is the proxy address inside the guest; egressListenAlt is
// used when a registry tunnel already listens there.
const (
	egressListen    = "127.0.0.1:3128"
	egressListenAlt = "127.0.0.2:3128"
)

// proxyArgs are BuildKit's predefined proxy build args, compared
// case-insensitively by BuildKit.
var proxyArgs = []string{"HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY"}

// network is what one build's steps may reach beyond the registry.
type network struct {
	// tunnel and dialer are set when the build gets the egress proxy.
	tunnel guest.Tunnel
	dialer guest.Dialer
	// nic is set when the build gets the user-mode NIC.
	nic  *guest.NIC
	stop func()
}

// buildNetwork prepares the network of a builder started for job. sink
// receives proxy denials until stop is called; the builder points it at
// the running build's sink.
func (r *Runtime) buildNetwork(job runtime.Job, registry []guest.Tunnel, sink progress.Sink, log *slog.Logger) (*network, error) {
	n := &network{stop: func() {}}
	switch job.Network {
	case "isolated":
		if len(job.AllowedDomains) > 0 {
			return nil, fmt.Errorf("vm runtime: build %s is isolated but lists allowed domains %v; allowed domains need network egress", job.BuildID, job.AllowedDomains)
		}
		return n, nil
	case "", "egress":
	default:
		return nil, fmt.Errorf("vm runtime: network %q is unknown; use egress or isolated", job.Network)
	}
	if len(job.AllowedDomains) == 0 {
		n.nic = &guest.NIC{
			Address:     microvm.UserNetGuest,
			Gateway:     microvm.UserNetGateway,
			DNS:         []string{microvm.UserNetDNS},
			Unreachable: []string{microvm.UserNetGateway + "/32"},
		}
		return n, nil
	}
	cfg := egress.Config{
		Allowed: job.AllowedDomains,
		OnDenied: func(host string, port int, reason string) {
			sink.Emit(progress.Event{Kind: progress.Message, Time: time.Now(),
				Message: fmt.Sprintf("egress proxy refused %s:%d: %s", host, port, reason)})
		},
		Logger: log,
	}
	if r.egressHook != nil {
		r.egressHook(&cfg)
	}
	p, err := egress.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("vm runtime: allowed domains of build %s: %w", job.BuildID, err)
	}
	listen := egressListen
	for _, t := range registry {
		if t.Listen == listen {
			listen = egressListenAlt
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.tunnel = guest.Tunnel{Name: "egress", Listen: listen}
	n.dialer = p.Dialer(ctx)
	n.stop = cancel
	return n, nil
}

// noProxyHosts are the registry host names that tunnels map to loopback
// IPs of the guest's own (Tunnel.Host), sorted, each once. buildkitd
// reaches them directly: the guest's hosts file takes them to their
// tunnels. NO_PROXY's rule makes an entry cover the names below it too
// (Go's, curl's), so a token realm or blob host below a tunnelled name
// (cdn01.quay.io below quay.io) is not reached through the proxy either;
// the guest has no resolver for it, so it is not reached at all. RUN
// steps keep the plain NO_PROXY (withProxy).
func noProxyHosts(tunnels []guest.Tunnel) []string {
	var out []string
	for _, t := range tunnels {
		if t.Host != "" {
			out = append(out, t.Host)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// withProxy points the request's proxy build args at the guest's egress
// proxy, replacing any the build set (in any case): nothing else is
// reachable from the guest.
func withProxy(req solve.Request, listen string) solve.Request {
	args := maps.Clone(req.BuildArgs)
	if args == nil {
		args = map[string]string{}
	}
	for k := range args {
		for _, p := range proxyArgs {
			if strings.EqualFold(k, p) {
				delete(args, k)
			}
		}
	}
	url := "http://" + listen
	args["HTTP_PROXY"] = url
	args["HTTPS_PROXY"] = url
	args["NO_PROXY"] = "localhost,127.0.0.1,::1"
	req.BuildArgs = args
	return req
}

// gatedSink forwards events until closed; the egress proxy's denials and
// the agent's events can race with the end of a build, and a sink must not
// get events after the call it was passed to returned.
type gatedSink struct {
	mu     sync.Mutex
	sink   progress.Sink
	closed bool
}

func (g *gatedSink) Emit(e progress.Event) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed {
		g.sink.Emit(e)
	}
}

func (g *gatedSink) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// switchSink forwards to the sink of the build running on a builder, and
// drops events between builds: the egress proxy is the builder's, its
// denials are the running build's.
type switchSink struct {
	mu   sync.Mutex
	sink progress.Sink
}

func (s *switchSink) Emit(e progress.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sink != nil {
		s.sink.Emit(e)
	}
}

func (s *switchSink) set(sink progress.Sink) {
	s.mu.Lock()
	s.sink = sink
	s.mu.Unlock()
}
