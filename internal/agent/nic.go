package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/guest"
)

// configureNIC brings up the guest's one non-loopback interface with the
// job's static address, default route and reject routes, and writes its
// resolver. The builder VM has no DHCP client and needs none: the host
// chose the addresses when it made the NIC.
func configureNIC(ctx context.Context, n guest.NIC, resolvConf string) error {
	addr, err := netlink.ParseAddr(n.Address)
	if err != nil {
		return fmt.Errorf("network interface: address %q: %w", n.Address, err)
	}
	gw := net.ParseIP(n.Gateway)
	if gw == nil {
		return fmt.Errorf("network interface: gateway %q is not an IP address", n.Gateway)
	}
	link, err := waitForNIC(ctx, 5*time.Second)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("network interface %s: add address %s: %w", name, n.Address, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("network interface %s: bring up: %w", name, err)
	}
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}); err != nil {
		return fmt.Errorf("network interface %s: default route via %s: %w", name, gw, err)
	}
	// After the default route: the kernel checks a gateway is reachable
	// when the route is added, and the gateway may be one of these.
	for _, p := range n.Unreachable {
		_, dst, err := net.ParseCIDR(p)
		if err != nil {
			return fmt.Errorf("network interface: unreachable prefix %q: %w", p, err)
		}
		if err := netlink.RouteReplace(&netlink.Route{Dst: dst, Type: unix.RTN_UNREACHABLE}); err != nil {
			return fmt.Errorf("network interface %s: reject route for %s: %w", name, p, err)
		}
	}
	var conf strings.Builder
	for _, ns := range n.DNS {
		if net.ParseIP(ns) == nil {
			return fmt.Errorf("network interface: DNS server %q is not an IP address", ns)
		}
		fmt.Fprintf(&conf, "nameserver %s\n", ns)
	}
	if err := os.WriteFile(resolvConf, []byte(conf.String()), 0o644); err != nil {
		return fmt.Errorf("write resolver configuration: %w", err)
	}
	return nil
}

// waitForNIC returns the first non-loopback link, waiting for its driver
// if it is still probing.
func waitForNIC(ctx context.Context, wait time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(wait)
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("network interface: list links: %w", err)
		}
		for _, l := range links {
			if l.Attrs().Flags&net.FlagLoopback == 0 && l.Type() == "device" {
				return l, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("network interface: the builder VM has no network device after %s (is virtio_net in the builder image's modules?)", wait)
		}
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
