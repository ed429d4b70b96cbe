// Package builders keeps a cache scope's builder up between its builds.
//
// A build leases its scope (Pool.Acquire): the scope's turn, its cache
// volume and, when one is kept, its running builder (buildkitd on the host,
// or a VM with kiln-agent and buildkitd). Builds of one scope take turns,
// because they share one volume. When the build ends (Lease.Release) a
// builder that may be reused stays up for Config.IdleTimeout, still holding
// the volume; the scope's next build runs on it with no boot, no buildkitd
// start and no mount. A builder is only ever reused for its own scope and
// for jobs of the shape it was started with (runtime.ShapeOf); a job of
// another shape stops it and starts a fresh one.
//
// What may cross from one build to the next is exactly what the volume
// holds, which is the scope's already: secrets, registry credentials, the
// context and network connections are per job (the runtimes' Builder.Run).
// A builder whose build ended in doubt (Builder.Reusable false: a timeout,
// an unconfirmed cancel, an exited buildkitd, an unresponsive agent) is
// stopped, not kept.
//
// Bounds: Config.MaxWarm caps builders kept up; a new one makes room by
// stopping the least recently used idle one. The cache volume manager asks
// the pool to let go of an idle scope (ReleaseIdle) before it evicts or
// deletes that scope's volume, and never touches one a build runs on.
// Close stops every idle builder at shutdown; after a crash the runtimes
// reap what was left (their state dirs), as for any interrupted build.
package builders
