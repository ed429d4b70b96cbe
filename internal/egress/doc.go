// Package egress is the host side of a build's `egress` network mode: an
// HTTP proxy that lets RUN steps reach only the domains the build allows.
//
// The builder VM has no network card. Its RUN steps get HTTP_PROXY and
// HTTPS_PROXY pointing at an address inside the guest; the agent forwards
// each TCP connection to it through the "egress" tunnel of the host↔guest
// channel (package guest), and the host end of that stream is served here,
// one client connection per ServeConn call. Proxy.Dialer plugs straight
// into guest.Host.Tunnels["egress"]; ListenAndServe serves a listener for
// the process runtime and tests.
//
// # What a client may do
//
//   - CONNECT host:port opens a raw tunnel (HTTPS, or anything else the
//     client wraps in CONNECT) after the checks below; the proxy answers
//     "200 Connection established" only once the upstream TCP connection
//     is up, and 403/502 otherwise, before any tunnel exists.
//   - An absolute-URI request (GET http://host/path) is forwarded with
//     hop-by-hop headers (Connection and the headers it names,
//     Proxy-Authorization, Proxy-Connection, Keep-Alive, TE, Trailer,
//     Transfer-Encoding, Upgrade) stripped; bodies stream both ways and are
//     never held whole in memory; the client connection is kept alive.
//   - Anything else (origin-form requests, https:// absolute URIs, which
//     clients must send through CONNECT) gets 400 with the reason.
//
// # The checks, in order
//
//  1. Port: 80 and 443, plus Config.Ports.
//  2. Name: the requested host, lower-cased and without a trailing dot,
//     must match Config.Allowed. "example.com" matches only itself;
//     "*.example.com" (or ".example.com") matches every name below it,
//     sub.example.com and a.b.example.com, but NOT example.com itself, so
//     a build that needs both lists both. An IP literal matches only an
//     entry that is the same IP literal; wildcards never match IPs.
//  3. Addresses: the name is resolved on the host, after the name check
//     (so a denied name is never even looked up), as an absolute name (no
//     resolv.conf search domains: the name checked is the name resolved;
//     only single-label names such as "localhost", which can only be
//     allowed exactly, resolve through /etc/hosts and search domains).
//     Loopback, private, link-local, CGNAT, unspecified, multicast and
//     reserved addresses are dropped from the answer, and the request is
//     denied when nothing is left. This is what stops an allowed name that
//     resolves, or is re-bound, to 127.0.0.1 or a metadata service from
//     reaching the host's own services. Config.AllowPrivate lifts it, but
//     only for names (or IPs) listed exactly, never for wildcard matches.
//     The proxy dials the checked address itself, so nothing resolves the
//     name a second time.
//
// A denied request gets 403 with a one-line body naming the host and
// pointing at --allow-domain, and Config.OnDenied is called so the build's
// events can show it. Request bodies, URLs (they carry tokens in query
// strings) and credentials (Authorization, Proxy-Authorization) are never
// logged; logs name only host and port.
//
// # Timeouts and cancellation
//
// Resolving and connecting to the upstream is bounded by
// Config.ConnectTimeout. Every upstream connection, tunnel or forward,
// closes after Config.IdleTimeout without a byte moving in either
// direction. Ending the ctx given to ServeConn, Dialer or ListenAndServe
// closes every connection it serves, open tunnels included.
package egress
