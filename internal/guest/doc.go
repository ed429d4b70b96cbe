// Package guest is the protocol between kiln on the host and kiln-agent
// inside a builder VM. Both sides live here so they cannot drift apart: the
// vm runtime calls Host.Connect and runs jobs on the Conn it returns, the
// agent calls Accept and takes the setup and then job after job from the
// Session.
//
// One session is one builder VM's life: the agent says hello, the host
// sets the builder up (the agent mounts the cache volume and starts
// buildkitd), then runs jobs on it one at a time, then releases it (the
// agent stops buildkitd, unmounts the volume and exits; the VM powers
// off). Nothing but the volume's contents crosses from one job to the
// next: each job's secrets, credentials, context, events and tunnel
// connections are its own and end with it.
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
//	agent → host  {"proto":"kiln-guest","version":5,"agent":"kiln-agent v…"}
//	host → agent  {"version":5}                      accepted
//	host → agent  {"version":5,"error":"…"}          refused; host closes
//
// The host waits Host.HelloTimeout for the hello (boot time). A different
// version is refused on both sides with an error wrapping
// ErrVersionMismatch that says to rebuild the builder image; any other
// first line (an old placeholder agent, console noise) is refused as not a
// hello. Version is bumped on any incompatible change below (version 1 ran
// exactly one job per session and had no setup, seq or release; version 2
// had no named context trees and no NoProxy, which its agent would drop
// without a word; version 3 had no entitlements, call or attestations;
// version 4 had no ssh agents, and its agent would drop a job's
// platforms, solve.Request.Platforms, and build the host's alone).
//
// # Multiplexing
//
// After the handshake both ends run yamux over the same byte stream, the
// agent as client, the host as server. Only the agent opens streams. Each
// stream starts with a JSON header line, answered by the host with a JSON
// reply line ({} to accept, {"error":"…"} to refuse and close):
//
//	{"kind":"control"}                              once, first
//	{"kind":"events","seq":N}                       once per setup or job
//	{"kind":"context","name":"context","seq":N}     the build context as a tar stream
//	{"kind":"context","name":"dockerfile","seq":N}  the Dockerfile dir, if separate
//	{"kind":"context","name":"named/I","seq":N}     a named local context, one per name
//	{"kind":"tunnel","name":"registry","seq":N}     one TCP connection, any number (any tunnel name)
//	{"kind":"tunnel","name":"ssh/ID","seq":N}       one ssh-agent connection of the job's agent ID
//
// seq numbers the session's work: 0 is the setup, jobs are 1, 2, … in the
// order the host sent them. The host refuses any stream whose seq is not
// the setup or job running at that moment, so a stream can never be opened
// for a job that has ended, or reach another job's context or tunnels.
//
// Frames after a header are JSON, one per line; the host refuses frames from
// the guest over 4 MiB, because the guest runs untrusted builds. An
// oversized or undecodable frame on the control stream ends the session.
//
// # Control stream
//
// Opened once by the agent, it carries the whole session. host → agent:
//
//	{"type":"setup","seq":0,"setup":{…}}                 first, once
//	{"type":"job","seq":N,"job":{…},"memory":{…}}       a job, only when idle
//	{"type":"cancel","seq":N}                           cancel the running setup or job N
//	{"type":"ack","seq":N}                              after done of N
//	{"type":"release"}                                  only when idle: tear down and exit
//
// agent → host:
//
//	{"type":"done","seq":N,"result":{…},"error":"…","canceled":bool,"broken":"…"}
//	{"type":"released","error":"…"}                     once, answering release
//
// The setup is Setup: the cache disk serial, GC bounds, insecure
// registries, network mode, parallelism, the NIC, and buildkitd's proxy
// with the host names it reaches without it (NoProxy: the registry names
// the job's tunnels map to guest IPs).
// Every job of the session has the same (Job.Setup; the host refuses a job
// whose setup differs). The agent answers the setup, like a job, with one
// done: no error means buildkitd is ready for jobs; an error means the
// agent has torn down what it set up and exits.
//
// A job is Job; the memory part carries solve.Request's memory-only fields
// (Secrets, RegistryAuth), which their JSON tags keep out of every other
// encoding. Each job message carries its own memory part, or none: the
// agent never reuses one job's secrets or credentials for another, and
// they live only in that job's solve session.
//
// Every setup and job gets exactly one done, then the host's ack; the
// host sends the next job only after that ack (the agent's task ends when
// the ack arrives, so the next job may follow right behind it). "broken"
// in a done says the builder cannot take another job (buildkitd exited, a
// job's cleanup failed); the host then sends no further job and releases
// or drops the builder.
//
// # Events stream
//
// One per setup and per job (agent → host): {"event":{progress.Event}} for
// the work and {"log":{"time","level","msg","attrs"}} for the agent's own
// log while that work runs, in the order they happened. The agent opens it
// when the setup or job arrives and closes it before sending done; the
// host delivers every event of a job before Conn.Run returns, to that job's
// sink, and none after. Agent log records between jobs stay in the guest.
//
// # Context streams (host → agent)
//
// A tar of the directory (files, dirs, symlinks; mode, owner, PAX mtimes)
// cut into chunks (4-byte big-endian length, bytes), ended by a zero length
// and a reply line ({} or {"error":"…"}), because a tar cut off between
// entries reads as a complete smaller context. The agent unpacks it through
// an os.Root, so no entry can land outside the target. On the wire
// Job.Solve.ContextDir is "context", DockerfileDir is "dockerfile" or
// empty, and each value of LocalContexts (named contexts from
// directories) is "named/I", I the name's index in the sorted names; host
// paths never reach the guest. The host serves a job only the trees of
// its own request; the agent unpacks each into a directory of its own
// below the job's work dir (context, dockerfile, named/I) and only names
// of these forms.
//
// # Tunnel streams
//
// After the accept reply, raw bytes both ways, half-closes passed on. The
// agent listens on each Job.Tunnels[i].Listen inside the guest while the
// job runs and opens one stream per accepted TCP connection; the host
// connects it with Host.Tunnels[name] (DialTCP for a registry). The name
// is the tunnel kind, so an HTTP CONNECT egress proxy, or a registry other
// than kiln's, is one more name and a Dialer, with no protocol change. At most 64 tunnel connections are
// open at once per job. When a job ends (its done arrived, or the host gave
// up on it) the host closes every tunnel connection and context stream of
// that job still open, before it acks; the agent closes its listeners and
// forwarded connections before it sends done.
//
// Registry addressing: the guest reaches a registry at the SAME host:port
// string the references use, because BuildKit takes the registry host from
// the reference. The vm runtime therefore sets Tunnel.Listen to exactly
// the referenced loopback IP:PORT or, for a host name, to a loopback IP of
// the guest's that Tunnel.Host maps the name to in the guest's /etc/hosts
// (written per job); the host side dials wherever the registry really
// listens: kiln's registry's own listener for "registry" (tests make the
// two differ to prove the push goes through the tunnel), the named
// host:port itself for "external:<host:port>". A registry's token realm,
// and any host it redirects blob requests to, must be reachable from the
// guest as well: on the same host:port, they ride the same tunnel;
// elsewhere, they need a way of their own (see the vm runtime).
//
// SSH agents: a job's solve.Request.SSH names the ssh-agent ids its RUN
// --mount=type=ssh steps may use; their SSHAgent dialer is memory-only
// and stays on the host. The agent's solve dials each agent connection as
// a tunnel stream named "ssh/ID" (no listener in the guest: BuildKit's
// session asks, the agent opens the stream), and the host connects it with
// the job's own SSHAgent, only for an ID of that job's SSH. Key files and
// the client's agent therefore never reach the guest, which sees the ids
// and the agent protocol's bytes only; the tunnel limit and the job's end
// apply to these streams as to any tunnel.
//
// # Ending a job
//
// Normal: the agent stops the job's tunnels, removes its context, closes
// events and sends done; the host acks. buildkitd and the mounted volume
// stay for the next job. Cancel: the host sends cancel, the agent cancels
// the job's solve (Task.Context, cause ErrCanceledByHost) and sends done
// with canceled=true; the host waits Host.CancelGrace for it. A cancel
// confirmed in time leaves the session usable; without a confirmation the
// Conn is unusable (Conn.Err), since the solve may still run, and the vm
// runtime kills the VM.
//
// # Ending the session
//
// Release: the host sends release while idle; the agent stops buildkitd,
// syncs and unmounts the volume, answers released (with the teardown's
// error, if any) and waits (10s at most) for the host to close the
// connection before it exits, which powers the VM off. The agent tears
// down the same way when its setup failed (after reporting it) and when
// the host went away.
//
// A connection that ends (VM died, agent crashed) ends the yamux session:
// the host fails the running job, or the next Run, with ErrAgentGone at
// once, and the agent's Session.Context and running Task.Context end with
// ErrHostGone. A frozen peer is found by the host's pings, during jobs and
// between them (Host.Unresponsive, then ErrAgentUnresponsive), and on the
// agent's side by yamux keepalives (30s interval, answers within the
// 3-minute write timeout).
package guest
