// Package cli is the client half of the kiln binary: `kiln build`,
// `kiln builds …`, `kiln images …`, `kiln cache …`, `kiln token …`,
// `kiln whoami` and the rest, all talking to a kiln server over the REST
// API in api/openapi.yaml.
//
// Plain JSON calls go through the generated client in package api. The two
// calls that are not plain JSON are done by hand with net/http: the build
// upload (a multipart body streamed through an io.Pipe, so a context of any
// size never sits in memory) and the build's Server-Sent Events stream,
// which is parsed here, resumed with Last-Event-ID when the connection
// drops, and replaced by polling while the events endpoint is unavailable.
//
// Commands never call os.Exit: errors carry their exit code (see ExitCode),
// and Run executes a command line in-process, which is what the tests do.
package cli
