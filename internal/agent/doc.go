// Package agent is kiln-agent's logic as a library: one builder session
// inside the builder VM, from the host's hello to the release.
// cmd/kiln-agent finds the host channel and calls Run with VMEnv; tests
// call Run in-process on the host against guest.Host over a socketpair,
// with a loop device standing in for the cache disk.
//
// Run sets the builder up once: it mounts the cache volume (ext4, found by
// its disk serial) at buildkitd's root, configures the NIC if the setup has
// one, and starts buildkitd on it through internal/buildkitd with the
// setup's GC bounds. Then it serves jobs one after another on that
// buildkitd: for each it unpacks the job's build context onto the volume,
// writes the hosts file and listens for the job's tunnels, solves through
// internal/solve with the job's secrets and credentials while streaming
// the job's events to the host, and removes the context and closes the
// tunnels before it reports the result. A canceled job only cancels its
// solve. When the host releases the builder, goes away, or the setup
// failed, Run stops buildkitd and syncs and unmounts the volume, so the
// volume is clean before the VM goes down. Secrets only ever live in
// memory, in the solve session of their job.
package agent
