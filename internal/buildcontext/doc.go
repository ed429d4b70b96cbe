// Package buildcontext moves a build context between the kiln CLI and the
// kiln server.
//
// The CLI side (Pack, Scan) turns a directory into a compressed tar the way
// `docker build` would choose the files: `.dockerignore` is honoured with
// BuildKit's semantics, the Dockerfile and `.dockerignore` are always sent,
// owners are erased, and the order is deterministic.
//
// The server side (Receive) is the trust boundary. It reads an upload in a
// single streaming pass, extracts it into a fresh directory without ever
// following a symlink, enforces size and entry limits as the bytes arrive,
// and computes the canonical context hash (see Info.Hash) in the same pass.
// Anything it does not like is refused with an *Error that carries its
// errdefs class and a message meant for the person who ran the build;
// the target directory is then removed, so a failed upload leaves nothing
// behind.
package buildcontext
