package egress

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// The server itself reaches out for builds too: it downloads URL and git
// contexts, and the vm runtime dials external registries for builders.
// Where a host got there by a wildcard (context.url_allowed,
// registries.allowed: "*", "*.example.com"), only public internet
// addresses may be behind it: a name that resolves to the server's own
// networks (169.254.169.254, 10.0.0.5, 127.0.0.1) would let a tenant
// probe them. Hosts the operator listed by name are trusted as listed.

// PublicOnly is a net.Dialer Control function: it refuses a connection
// to an address that is not on the public internet. It runs on the
// address actually dialed, after resolution, so a name that resolves
// differently on a second lookup (DNS rebinding) cannot slip past it.
func PublicOnly(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("dial %s: %w", address, err)
	}
	if !public(ap.Addr()) {
		return notPublic(ap.Addr())
	}
	return nil
}

// CheckPublic resolves host and refuses it if any of its addresses is not
// on the public internet. For a program kiln runs (git), whose dials it
// cannot watch; PublicOnly is the stronger check where kiln dials.
func CheckPublic(ctx context.Context, host string) error {
	if a, err := netip.ParseAddr(host); err == nil {
		if !public(a) {
			return notPublic(a)
		}
		return nil
	}
	addrs, err := resolveAbsolute(ctx, host)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", host, err)
	}
	for _, a := range addrs {
		if !public(a) {
			return notPublic(a)
		}
	}
	return nil
}

func notPublic(a netip.Addr) error {
	return errdefs.Forbidden("%s is not a public internet address (it is on the server's own or a private network), and the host was allowed only by a wildcard: the operator must list it by host:port to allow it", a)
}

// Listed reports whether an entry of allowed (an operator's list of
// host, host:port and *.domain entries) names host[:port] itself rather
// than matching it by a wildcard: only such a host may lead into the
// server's own networks. localhost and 127.0.0.1 are one host, as the
// vm runtime tunnels the one to the other.
func Listed(host string, allowed []string) bool {
	host = strings.ToLower(host)
	name, port, err := net.SplitHostPort(host)
	if err != nil {
		name, port = host, ""
	}
	names := []string{name}
	switch name {
	case "localhost":
		names = append(names, "127.0.0.1")
	case "127.0.0.1":
		names = append(names, "localhost")
	}
	for _, a := range allowed {
		a = strings.ToLower(strings.TrimSpace(a))
		for _, n := range names {
			if a == n || port != "" && a == net.JoinHostPort(n, port) {
				return true
			}
		}
	}
	return false
}

// DialPublic dials address (host:port), refusing addresses that are not
// on the public internet.
func DialPublic(ctx context.Context, address string) (net.Conn, error) {
	d := net.Dialer{Control: PublicOnly}
	return d.DialContext(ctx, "tcp", address)
}
