// Package solve runs one BuildKit solve of a Dockerfile through the BuildKit
// Go client and turns BuildKit's status stream into progress events.
//
// It assumes nothing about the host: callers hand it a connected client and
// a Request, so the process runtime and the guest agent inside a builder VM
// share the same code. Secrets and registry credentials are served to
// buildkitd from memory through the session; nothing is written to disk.
// RUN --mount=type=ssh is served the same way, by kiln's own sshforward
// server relaying each agent connection to Request.SSHAgent (ssh.go).
package solve
