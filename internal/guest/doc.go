// Package guest is the protocol between kiln on the host and kiln-agent
// inside a builder VM. Both sides live here so they cannot drift apart: the
// vm runtime calls Host.Serve, the agent calls Accept and uses the Session.
//
// # Transport
//
// One reliable byte stream: a virtio-serial port (the guest opens
// /dev/vportNpM once, read-write; the host end is QEMU's chardev socket), a
// vsock connection where the host has one, a socketpair in tests.
//
// # Handshake (before multiplexing)
//
// The agent speaks first. A virtio-serial port drops whatever the host
// sends while the guest has the port closed, so the host sends nothing until
// it has read the agent's hello (guest writes block until the host end is
// connected, so the hello itself cannot be lost). Both are single JSON lines:
//
//	agent → host  {"proto":"kiln-guest","version":1,"agent":"kiln-agent v…"}
//	host → agent  {"version":1}                      accepted
//	host → agent  {"version":1,"error":"…"}          refused; host closes
//
// The host waits Host.HelloTimeout for the hello (boot time). A different
// version is refused on both sides with an error wrapping
// ErrVersionMismatch that says to rebuild the builder image; any other
// first line (an old placeholder agent, console noise) is refused as not a
// hello. Version is bumped on any incompatible change below.
//
// # Multiplexing
//
// After the handshake both ends run yamux over the same byte stream, the
// agent as client, the host as server. Only the agent opens streams. Each
// stream starts with a JSON header line, answered by the host with a JSON
// reply line ({} to accept, {"error":"…"} to refuse and close):
//
//	{"kind":"control"}                    once, first
//	{"kind":"events"}                     once, second
//	{"kind":"context","name":"context"}   the build context as a tar stream
//	{"kind":"context","name":"dockerfile"} the Dockerfile dir, if separate
//	{"kind":"tunnel","name":"registry"}   one TCP connection, any number
//
// Frames after a header are JSON, one per line; the host refuses frames from
// the guest over 4 MiB, because the guest runs untrusted builds.
//
// Control stream. host → agent: {"type":"job","job":{…},"memory":{…}}
// first; the job is Job, the memory part carries solve.Request's memory-only
// fields (Secrets, RegistryAuth), which their JSON tags keep out of every
// other encoding. Then at most {"type":"cancel"} and, after the result,
// {"type":"ack"}. agent → host: exactly one
// {"type":"done","result":{…},"error":"…","canceled":bool}.
//
// Events stream (agent → host): {"event":{progress.Event}} for the build and
// {"log":{"time","level","msg","attrs"}} for the agent's own log, in the
// order they happened. The agent closes it before sending done, and the host
// delivers every event before Serve returns; none after.
//
// Context streams (host → agent): a tar of the directory (files, dirs,
// symlinks; mode, owner, PAX mtimes) cut into chunks (4-byte big-endian
// length, bytes), ended by a zero length and a reply line ({} or
// {"error":"…"}), because a tar cut off between entries reads as a complete
// smaller context. The agent unpacks it through an os.Root, so no entry can
// land outside the target. On the wire Job.Solve.ContextDir is "context" and
// DockerfileDir is "dockerfile" or empty; host paths never reach the guest.
//
// Tunnel streams: after the accept reply, raw bytes both ways, half-closes
// passed on. The agent listens on each Job.Tunnels[i].Listen inside the
// guest and opens one stream per accepted TCP connection; the host connects
// it with Host.Tunnels[name] (DialTCP for the registry). The name is the
// tunnel kind, so an HTTP CONNECT egress proxy later is one more name and a
// Dialer, with no protocol change. At most 64 tunnel connections are open at
// once per build.
//
// Registry addressing: the guest reaches kiln's registry at the SAME
// host:port string the push references use, because BuildKit takes the
// registry host from the reference. The vm runtime therefore sets
// Tunnel.Listen to exactly the referenced loopback IP:PORT or, for a host
// name, to a loopback IP of the guest's that Tunnel.Host maps the name to
// in the guest's /etc/hosts; the host side
// dials wherever the registry really listens. Tests make the two differ to
// prove the push goes through the tunnel. The registry's token realm must
// be reachable from the guest as well: served on the same host:port, it
// rides the same tunnel; elsewhere, it needs a tunnel of its own.
//
// # Ending
//
// Normal: agent stops buildkitd, unmounts the volume, closes events, sends
// done; host acks; agent exits (the VM powers off). Cancel: the host sends
// cancel, the agent cancels the solve (Session.Context, cause
// ErrCanceledByHost), cleans up the same way and sends done with
// canceled=true; the host waits Host.CancelGrace for it, then gives up. A
// connection that ends (VM died, agent crashed) ends the yamux session: the
// host returns ErrAgentGone at once, the agent's Session.Context ends with
// ErrHostGone. A frozen peer is found by yamux keepalives (15s interval,
// 30s timeout).
package guest
