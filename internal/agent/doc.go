// Package agent is kiln-agent's logic as a library: one build inside the
// builder VM, from the host's hello to the result. cmd/kiln-agent finds the
// host channel and calls Run with VMEnv; tests call Run in-process on the
// host against guest.Host over a socketpair, with a loop device standing in
// for the cache disk.
//
// Run mounts the cache volume (ext4, found by its disk serial) at
// buildkitd's root, starts buildkitd on it through internal/buildkitd with
// the job's GC bounds, unpacks the build context onto the volume, listens
// for the job's tunnels, solves through internal/solve while streaming
// events to the host, and then stops buildkitd and syncs and unmounts the
// volume before it reports the result, so the volume is clean before the
// host tears the VM down. Secrets only ever live in memory.
package agent
