package egress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Config says which destinations a build may reach. The zero value allows
// nothing.
type Config struct {
	// Allowed lists the reachable hosts: "example.com" exactly, or
	// "*.example.com" / ".example.com" for every name below example.com
	// (not example.com itself). IP literals ("10.0.0.5", "::1") match only
	// themselves. Case and a trailing dot do not matter; names are ASCII
	// (IDNs in their xn-- form).
	Allowed []string
	// Ports are opened in addition to 80 and 443.
	Ports []int
	// AllowPrivate lets exactly listed names and IPs reach loopback,
	// private and link-local addresses. Wildcard matches never may.
	AllowPrivate bool
	// OnDenied is called for each refused request, so the build's events
	// can show it; reason is one short sentence. It runs on the request's
	// goroutine, possibly for several connections at once.
	OnDenied func(host string, port int, reason string)
	// Resolve looks a host name up (default: the system resolver, as an
	// absolute name).
	Resolve func(ctx context.Context, host string) ([]netip.Addr, error)
	// Dial connects to a checked ip:port (default: net.Dialer).
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// ConnectTimeout bounds resolving and connecting to one upstream
	// (default 15s).
	ConnectTimeout time.Duration
	// IdleTimeout closes an upstream connection after this long with no
	// bytes moving either way, and a kept-alive client connection after
	// this long without a request (default 5 minutes).
	IdleTimeout time.Duration
	// Logger gets denials at Info and connections at Debug (default
	// slog.Default()).
	Logger *slog.Logger
}

// Proxy is the egress proxy for one build. It is safe for concurrent use;
// each client connection is served on its own.
type Proxy struct {
	exact    map[string]bool // names and canonical IP literals
	suffixes []string        // ".example.com" for "*.example.com"
	ports    []int           // sorted
	cfg      Config
	log      *slog.Logger
}

const (
	defaultConnectTimeout = 15 * time.Second
	defaultIdleTimeout    = 5 * time.Minute
)

// New checks cfg and returns its proxy.
func New(cfg Config) (*Proxy, error) {
	p := &Proxy{exact: map[string]bool{}, ports: []int{80, 443}, cfg: cfg, log: cfg.Logger}
	for _, entry := range cfg.Allowed {
		if err := p.addAllowed(entry); err != nil {
			return nil, fmt.Errorf("allowed domain %q: %w", entry, err)
		}
	}
	for _, port := range cfg.Ports {
		if port < 1 || port > 65535 {
			return nil, fmt.Errorf("egress port %d is not a TCP port (1-65535)", port)
		}
		if !slices.Contains(p.ports, port) {
			p.ports = append(p.ports, port)
		}
	}
	slices.Sort(p.ports)
	if p.cfg.Resolve == nil {
		p.cfg.Resolve = resolveAbsolute
	}
	if p.cfg.Dial == nil {
		var d net.Dialer
		p.cfg.Dial = d.DialContext
	}
	if p.cfg.ConnectTimeout <= 0 {
		p.cfg.ConnectTimeout = defaultConnectTimeout
	}
	if p.cfg.IdleTimeout <= 0 {
		p.cfg.IdleTimeout = defaultIdleTimeout
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	return p, nil
}

func (p *Proxy) addAllowed(entry string) error {
	s := strings.ToLower(strings.TrimSpace(entry))
	switch {
	case s == "":
		return errors.New("empty entry")
	case strings.Contains(s, "://"):
		return errors.New("give the host name only, without a scheme")
	case s == "*" || s == "*." || s == ".":
		return errors.New("a bare wildcard would allow every domain; list the domains the build needs")
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		if a.Zone() != "" {
			return errors.New("an IP address with a zone cannot be allowed")
		}
		p.exact[a.Unmap().String()] = true
		return nil
	}
	if strings.Contains(s, ":") || strings.Contains(s, "/") {
		return errors.New("give the host name only, without a port or path (ports are configured separately)")
	}
	s = strings.TrimSuffix(s, ".")
	wild := false
	if rest, ok := strings.CutPrefix(s, "*."); ok {
		s, wild = rest, true
	} else if rest, ok := strings.CutPrefix(s, "."); ok {
		s, wild = rest, true
	}
	if strings.Contains(s, "*") {
		return errors.New(`"*" is only allowed as the whole first label, as in "*.example.com"`)
	}
	if !validName(s) {
		return errors.New("not a valid DNS name (letters, digits, '-', '_' and dots; IDNs in xn-- form)")
	}
	if wild {
		p.suffixes = append(p.suffixes, "."+s)
	} else {
		p.exact[s] = true
	}
	return nil
}

// validName reports whether s is a DNS name. The last label may not be all
// digits: no TLD is, and resolvers read names like "127.1" or "2130706433"
// as IPv4 addresses, which would slip past the IP-literal rule.
func validName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	labels := strings.Split(s, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	last := labels[len(labels)-1]
	return strings.Trim(last, "0123456789") != ""
}

// denial is a refused request. Its message is what the client reads in
// the 403 body.
type denial struct {
	host   string
	port   int
	reason string
	hint   string
}

func (d *denial) Error() string {
	return fmt.Sprintf("kiln egress proxy: %s denied: %s; %s",
		net.JoinHostPort(d.host, strconv.Itoa(d.port)), d.reason, d.hint)
}

// target is a destination that passed the name and port checks.
type target struct {
	host  string      // normalized name or canonical IP
	ip    *netip.Addr // set for IP literals
	port  int
	exact bool // listed exactly, not through a wildcard
}

// check applies the port and name rules to a requested host (as it came,
// without brackets) and port.
func (p *Proxy) check(host string, port int) (target, *denial) {
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	deny := func(reason, hint string) (target, *denial) {
		return target{}, &denial{host: h, port: port, reason: reason, hint: hint}
	}
	if !slices.Contains(p.ports, port) {
		return deny(fmt.Sprintf("port %d is not open for egress (open: %s)", port, joinInts(p.ports)),
			"egress is limited to the domains and ports this build allows")
	}
	if a, err := netip.ParseAddr(h); err == nil {
		a = a.Unmap()
		if a.Zone() == "" && p.exact[a.String()] {
			return target{host: a.String(), ip: &a, port: port, exact: true}, nil
		}
		return deny("IP addresses are only reachable when listed exactly", "use a host name allowed with --allow-domain")
	}
	if !validName(h) {
		return deny("not a valid host name", "egress is limited to the domains allowed with --allow-domain")
	}
	if p.exact[h] {
		return target{host: h, port: port, exact: true}, nil
	}
	for _, suf := range p.suffixes {
		if strings.HasSuffix(h, suf) {
			return target{host: h, port: port}, nil
		}
	}
	return deny(h+" is not in this build's allowed domains", "add it with --allow-domain "+h)
}

// addresses resolves t and keeps the addresses it may reach, public ones
// first by family (IPv4 first, as hosts without IPv6 routes are common).
func (p *Proxy) addresses(ctx context.Context, t target) ([]netip.Addr, error) {
	var found []netip.Addr
	if t.ip != nil {
		found = []netip.Addr{*t.ip}
	} else {
		addrs, err := p.cfg.Resolve(ctx, t.host)
		if err != nil {
			return nil, fmt.Errorf("resolve %s: %w", t.host, err)
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("resolve %s: no addresses", t.host)
		}
		found = addrs
	}
	mayPrivate := t.exact && p.cfg.AllowPrivate
	var ok, refused []netip.Addr
	for _, a := range found {
		a = a.Unmap()
		if mayPrivate || public(a) {
			ok = append(ok, a)
		} else {
			refused = append(refused, a)
		}
	}
	if len(ok) == 0 {
		return nil, &denial{host: t.host, port: t.port,
			reason: fmt.Sprintf("%s resolves only to non-public addresses (%s), which builds may not reach", t.host, joinAddrs(refused)),
			hint:   "egress is limited to public addresses of the domains allowed with --allow-domain"}
	}
	slices.SortStableFunc(ok, func(a, b netip.Addr) int {
		switch {
		case a.Is4() == b.Is4():
			return 0
		case a.Is4():
			return -1
		}
		return 1
	})
	return ok, nil
}

// dial resolves and checks t and connects to the first address that
// answers, within ConnectTimeout. The connection closes itself after
// IdleTimeout without traffic.
func (p *Proxy) dial(ctx context.Context, t target) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	addrs, err := p.addresses(ctx, t)
	if err != nil {
		return nil, err
	}
	var errs []error
	for i, a := range addrs {
		// Leave the later addresses a share of the time, so one address
		// that never answers does not use it all.
		actx, acancel := ctx, context.CancelFunc(func() {})
		if deadline, ok := ctx.Deadline(); ok && i < len(addrs)-1 {
			share := time.Until(deadline) / time.Duration(len(addrs)-i)
			actx, acancel = context.WithTimeout(ctx, max(share, 2*time.Second))
		}
		addr := netip.AddrPortFrom(a, uint16(t.port)).String()
		c, err := p.cfg.Dial(actx, "tcp", addr)
		acancel()
		if err == nil {
			p.log.Debug("egress connected", "host", t.host, "port", t.port, "addr", addr)
			return newIdleConn(c, p.cfg.IdleTimeout), nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	if ctx.Err() != nil && len(errs) > 0 && errors.Is(errs[len(errs)-1], context.DeadlineExceeded) {
		return nil, fmt.Errorf("connect to %s:%d: timed out after %s", t.host, t.port, p.cfg.ConnectTimeout)
	}
	return nil, fmt.Errorf("connect to %s:%d: %w", t.host, t.port, errors.Join(errs...))
}

// resolveAbsolute asks the system resolver for host as an absolute name, so
// resolv.conf search domains cannot turn a name matched by a wildcard into
// another one. Single-label names (only ever allowed exactly, like
// "localhost" or "mirror") stay relative: /etc/hosts and the admin's search
// domains are how such names resolve at all.
func resolveAbsolute(ctx context.Context, host string) ([]netip.Addr, error) {
	if strings.Contains(host, ".") {
		host += "."
	}
	return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
}

var nonPublic = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),          // "this network"; 0.0.0.0 reaches the host itself
	netip.MustParsePrefix("100.64.0.0/10"),      // CGNAT, used for cloud and VPN internals
	netip.MustParsePrefix("192.0.0.0/24"),       // IETF protocol assignments
	netip.MustParsePrefix("198.18.0.0/15"),      // benchmarking
	netip.MustParsePrefix("240.0.0.0/4"),        // reserved, broadcast
	netip.MustParsePrefix("64:ff9b:1::/48"),     // local-use NAT64
	netip.MustParsePrefix("2001:db8::/32"),      // documentation
	netip.MustParsePrefix("fec0::/10"),          // deprecated site-local
	netip.MustParsePrefix("100::/64"),           // discard-only
	netip.MustParsePrefix("2001::/23"),          // IETF protocol assignments
	netip.MustParsePrefix("2002::/16"),          // 6to4 can wrap any IPv4 address
	netip.MustParsePrefix("ff00::/8"),           // multicast
	netip.MustParsePrefix("::/128"),             // unspecified
	netip.MustParsePrefix("fc00::/7"),           // unique local
	netip.MustParsePrefix("169.254.0.0/16"),     // link-local, metadata services
	netip.MustParsePrefix("fe80::/10"),          // link-local
	netip.MustParsePrefix("127.0.0.0/8"),        // loopback
	netip.MustParsePrefix("10.0.0.0/8"),         // private
	netip.MustParsePrefix("172.16.0.0/12"),      // private
	netip.MustParsePrefix("192.168.0.0/16"),     // private
	netip.MustParsePrefix("255.255.255.255/32"), // broadcast
}

var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// public reports whether a is an address on the public internet, the only
// kind a build reaches through a name matched by a wildcard.
func public(a netip.Addr) bool {
	a = a.Unmap()
	if a.Zone() != "" || !a.IsGlobalUnicast() || a.IsPrivate() {
		return false
	}
	if nat64.Contains(a) {
		// The well-known NAT64 prefix embeds an IPv4 address the gateway
		// would connect to.
		b := a.As16()
		return public(netip.AddrFrom4([4]byte(b[12:])))
	}
	for _, p := range nonPublic {
		if p.Contains(a) {
			return false
		}
	}
	return true
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ", ")
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}
