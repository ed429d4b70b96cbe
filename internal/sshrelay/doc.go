// Package sshrelay carries ssh-agent connections from a kiln client to a
// build on the server (kiln build --ssh, as docker buildx spells it).
//
// The client's agent never leaves the client's machine and its keys never
// leave the agent: the build's RUN --mount=type=ssh steps speak the agent
// protocol, each connection travels to the client over the build's ssh
// session, and the client answers it from its own agent (read-only: a
// build may list keys and ask for signatures, never add, remove or lock).
//
// # The session
//
// One per build, opened by the client once the build is submitted:
//
//	GET /v1/builds/{id}/ssh
//	Connection: Upgrade
//	Upgrade: kiln-ssh/1
//
// The server answers 101 Switching Protocols (after the same checks as any
// build route: an error answer is an ordinary JSON error), and from then on
// the connection carries yamux (github.com/hashicorp/yamux), the server as
// yamux client, the client as yamux server. Only the server opens streams:
// each stream is one agent connection. It starts with one JSON line naming
// the agent, answered by one JSON line from the client:
//
//	server → client  {"id":"default"}
//	client → server  {}                       accepted; agent protocol follows
//	client → server  {"error":"…"}            refused; the client closes
//
// After the accept, the raw ssh-agent protocol both ways; a half-close is
// passed on. The session ends when the build ends (the server closes it),
// when the client goes away, or when yamux's keepalive finds the peer gone;
// every agent connection open at that moment fails, and so does the step
// using it: a build never hangs on a vanished client.
//
// Key files (--ssh ID=KEYFILE) take no session: the client sends them with
// the submission like secrets, the server holds them in memory only and
// serves them from an in-memory keyring (Keyring), read-only as well.
package sshrelay
