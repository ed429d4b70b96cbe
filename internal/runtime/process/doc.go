// Package process is the "process" builder runtime: for each build it
// loop-mounts the build's ext4 cache volume on the host, starts a private
// buildkitd (internal/buildkitd; own process group) with its root on that
// volume, runs the solve through internal/solve, and tears all of it down
// again before Run returns.
//
// It needs root, runc, losetup and a buildkitd binary. Build steps run as
// host root inside runc containers with host networking, so it is meant for
// development and trusted builders; untrusted builds belong in the vm
// runtime.
//
// Steps run on the host's kernel, so builds target the host's platform
// (and linux/386 on an x86-64 kernel that runs it), and a foreign
// platform only where the host has an enabled binfmt_misc handler for its
// executables, registered with the fix-binary flag (platforms.go:
// CheckPlatforms, asked at submission).
package process
