// Package vm is the "vm" builder runtime: every build boots a fresh QEMU
// microVM from the builder image (internal/builderimage) and runs its solve
// there, so untrusted Dockerfiles never run on the host.
//
// One Run: start the VM (internal/microvm: KVM when usable, else TCG) with
// the image's kernel, initramfs and read-only erofs root (serial kiln-root),
// the build's ext4 cache volume as a writable disk (serial kiln-cache), the
// job's memory and CPUs, and the virtio-serial port kiln.0. Then serve the
// job to kiln-agent over that port with internal/guest: the build context is
// streamed over the channel, events come back over it, and kiln's registry
// is reached through a "registry" tunnel. Streaming the context (rather
// than attaching a per-build context disk) lands it on the cache volume,
// where BuildKit reads it, with no image to make and delete per build.
// Inside, the agent mounts the volume at /var/lib/buildkit, runs buildkitd
// and the solve, unmounts, reports the result and exits; the VM then ends
// by itself.
//
// Registry addressing: BuildKit takes the registry from the image
// reference, so the agent listens inside the guest on exactly the host:port
// the push references (and InsecureRegistries, cache refs, named contexts)
// name, and the host side dials Config.RegistryAddr, where the registry
// really listens. A loopback IP (127.0.0.1:7070) is listened on as is; a
// host name (kiln.example.com:7070, an operator's registry_host) gets a
// loopback IP of its own in 127.0.1.0/24 and a line in the guest's
// /etc/hosts, so the same references work on the host and in the guest. A
// non-loopback IP is refused before booting: the guest cannot own it.
//
// Network (see network.go): an isolated build has no network card and
// reaches only the registry tunnel. An egress build with allowed domains
// has no card either and gets an HTTP proxy inside the guest
// (HTTP_PROXY/HTTPS_PROXY, set as BuildKit's proxy build args, which stay
// out of the image and the cache key; buildkitd uses it too), served on the
// host by internal/egress through an "egress" tunnel. An egress build
// without a list gets QEMU's user-mode NIC, configured statically by the
// agent, with the host-loopback alias routed nowhere.
//
// Hypervisor: Run needs only what the machine interface says, a VM with a
// named byte-stream port, an exit signal, a kill and a console, so a Cloud
// Hypervisor or Firecracker driver (same disks, vsock instead of
// virtio-serial: each is a net.Conn) plugs in through Config.Start.
//
// Cancel: when ctx ends the agent is asked to stop and gets CancelGrace
// (default 1s) to unmount the volume; then QEMU is killed whatever the
// guest is doing, so the VM is gone within about CancelGrace plus the time
// to reap QEMU. A volume whose VM was killed has not been unmounted: its
// ext4 journal makes it consistent again when it is next mounted (journal
// replay and orphan cleanup), which the next build's mount does first. That
// is what "clean after a kill" means here, and the tests check exactly it:
// a copy of the volume, mounted and unmounted once, passes e2fsck -fn.
//
// Leftovers: each running build has a directory in StateDir (QEMU's
// sockets while it starts, and state.json naming the build and QEMU's PID).
// Run removes it before returning; New kills the QEMU processes that a
// crashed server left behind (found by PID and by their command line, which
// names that directory) and removes the directories. QEMU also runs with a
// parent-death signal, so a crashed kiln normally takes its VMs with it.
package vm
