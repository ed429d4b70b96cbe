// Package vm is the "vm" builder runtime: builds run in QEMU microVMs
// booted from the builder image (internal/builderimage), so untrusted
// Dockerfiles never run on the host.
//
// A builder is one VM on one cache volume. StartBuilder starts the VM
// (internal/microvm: KVM when usable, else TCG) with the image's kernel,
// initramfs and read-only erofs root (serial kiln-root), the build's ext4
// cache volume as a writable disk (serial kiln-cache), the job's memory
// and CPUs, and the virtio-serial port kiln.0, and connects to kiln-agent
// over that port with internal/guest: the agent mounts the volume at
// /var/lib/buildkit and starts buildkitd (phases "booting", "starting
// buildkitd"). Builder.Run then runs one build on it: the build context
// (and each named local context, --build-context NAME=DIR) is streamed
// over the channel onto the volume, events come back over it, and
// kiln's registry is reached through a "registry" tunnel (other registries
// the build names through tunnels of their own), and each ssh-agent
// connection of a RUN --mount=type=ssh step comes back to the host as a
// tunnel stream "ssh/<id>" served by the job's own solve.Request.SSHAgent
// (no listener, no key in the guest), all of it per build. Builder.Run may be called again with builds of the same shape
// (runtime.ShapeOf): nothing but the BuildKit cache on the volume crosses
// from one build to the next. Builder.Stop has the agent stop buildkitd,
// unmount the volume and exit, which powers the VM off.
//
// Run is the one-shot form, StartBuilder + Builder.Run + Builder.Stop, one
// VM per build. Streaming the context (rather than attaching a per-build
// context disk) lands it on the cache volume, where BuildKit reads it,
// with no image to make and delete per build.
//
// Reuse: a builder stays Reusable after a build that ended with a result
// or a build failure, or with a cancel the agent confirmed within
// CancelGrace. It is not after a timeout, an unconfirmed cancel, an exited
// buildkitd, or when its VM or agent went away or froze, also while it sat
// idle: the host pings the agent between builds too (Unresponsive), and a
// VM that ends closes the channel. A build whose VM froze or died under it
// fails with an error wrapping runtime.ErrBuilderLost (and
// guest.ErrAgentGone); Run retries such a build once in a fresh VM, with
// one vCPU under TCG.
//
// Registry addressing: BuildKit takes the registry from the image
// reference, so the agent listens inside the guest on exactly the host:port
// the push references (and InsecureRegistries, cache refs, named contexts)
// name. A loopback IP (127.0.0.1:7070) is listened on as is; a host name
// (kiln.example.com:7070, an operator's registry_host, ghcr.io) gets a
// loopback IP of its own in 127.0.1.0/24 and a line in the guest's
// /etc/hosts, so the same references work on the host and in the guest. A
// non-loopback IP is refused before booting: the guest cannot own it.
// What the host side dials depends on whose registry it is. kiln's own
// (runtime.Job.Registry, with localhost:P and 127.0.0.1:P as one; every
// host when Job.Registry is empty) rides the "registry" tunnel to
// Config.RegistryAddr, where kiln's registry really listens. Any other
// (a --push, a registry cache or a docker-image:// context elsewhere) is
// external: its tunnel, "external:<host:port>", dials that host:port from
// the host, resolving the name there, with no kiln code in the stream, so
// TLS runs end to end between BuildKit and the registry under the
// reference's server name, and BuildKit logs in with the job's
// memory-only RegistryAuth. An external host without a port is HTTPS on
// 443, or plain HTTP on 80 when listed in InsecureRegistries, which is
// also what makes BuildKit speak plain HTTP to one with a port; docker.io
// is registry-1.docker.io, as BuildKit names it. Whether the build may
// reach a host at all is the server's decision, at submission; where it
// was allowed only by a wildcard (egress.Listed: not named in Job.AllowedRegistries itself), the host
// side dials public internet addresses only (egress.PublicOnly, on the
// address dialed), so a name resolving into the server's own networks
// reaches nothing there. A
// builder's dialers are fixed when it starts; the hosts are part of its
// shape, so every build it takes names the same ones. Only the hosts the
// references name are tunnelled: a token realm or blob redirect on another
// host (Docker Hub's auth.docker.io, the storage hosts some registries
// send downloads to) is reached only by an egress build, as its steps
// would reach it (its NIC, or the egress proxy when allowed). Not through
// the proxy, though, when it lies below a tunnelled host name
// (cdn01.quay.io below quay.io): buildkitd's NO_PROXY holds the tunnelled
// names, and a NO_PROXY entry covers the names below it.
//
// Platforms (platforms.go): a build may target what the builder image
// runs natively (linux/amd64, linux/386) and what its QEMU user-mode
// emulators run (Manifest.Emulates: linux/arm64, linux/arm/v6, v7,
// linux/riscv64, linux/ppc64le, linux/s390x), which /init registers with
// binfmt_misc in the guest and buildkitd then reports as its worker's.
// CheckPlatforms refuses anything else at submission, as invalid input
// naming what the server builds.
//
// Network (see network.go): an isolated build has no network card and
// reaches only the registry tunnels. An egress build with allowed domains
// has no card either and gets an HTTP proxy inside the guest
// (HTTP_PROXY/HTTPS_PROXY, set as BuildKit's proxy build args, which stay
// out of the image and the cache key; buildkitd uses it too, except for
// the registry host names it has tunnels for, which are in its NO_PROXY so
// that they reach their tunnels), served on the host by internal/egress
// through an "egress" tunnel. An egress build without a list gets QEMU's
// user-mode NIC, configured statically by the agent, with the
// host-loopback alias routed nowhere.
//
// The egress proxy and the user-mode NIC are the builder's, set up with it;
// the proxy's denials go to the running build's events, and every tunnel
// connection of a build is closed when that build ends.
//
// Hypervisor: a builder needs only what the machine interface says, a VM
// with a named byte-stream port, an exit signal, a kill and a console, so a
// Cloud Hypervisor or Firecracker driver (same disks, vsock instead of
// virtio-serial: each is a net.Conn) plugs in through Config.Start.
//
// Cancel: when a build's ctx ends the agent is asked to stop the solve and
// gets CancelGrace (default 1s) to confirm; without a confirmation QEMU is
// killed whatever the guest is doing. Run (one-shot) then kills the VM in
// any case, so it is gone within about CancelGrace plus the time to reap
// QEMU. A volume whose VM was killed has not been unmounted: its ext4
// journal makes it consistent again when it is next mounted (journal
// replay and orphan cleanup), which the next builder's mount does first.
// That is what "clean after a kill" means here, and the tests check exactly
// it: a copy of the volume, mounted and unmounted once, passes e2fsck -fn.
// A builder stopped with Stop while healthy leaves the volume unmounted.
//
// Leftovers: each running builder has a directory in StateDir, named per
// builder (b-<random>), not per build, since it outlives builds: QEMU's
// sockets while it starts, and state.json naming the builder, its volume,
// the build running on it (if any) and QEMU's PID. Stop removes it; New
// kills the QEMU processes that a crashed server left behind, running a
// build or idle (found by PID and by their command line, which names that
// directory), and removes the directories. QEMU also runs with a
// parent-death signal, so a crashed kiln normally takes its VMs with it.
package vm
