// Package runner is the engine of `kiln run IMAGE [-- CMD...]`: it boots a
// converted image (internal/rootfs) in a QEMU microVM with the builder
// image's kernel and kiln-init, runs the image's entrypoint and cmd with
// its environment, working directory and user, streams the process's
// stdout and stderr, and returns its exit code. It proves a built image
// boots.
//
// # What the process sees
//
// Docker semantics wherever they apply:
//   - argv is Entrypoint + Cmd; Spec.Args replace Cmd, the entrypoint stays.
//   - The environment is the image's, Spec.Env entries replacing those with
//     the same key; PATH defaults to DefaultPath and HOSTNAME to the
//     hostname when the image sets none; HOME comes from the user's passwd
//     entry when unset.
//   - The user ("name", "uid", optionally ":group"/":gid") is resolved in
//     the image's /etc/passwd and /etc/group, with supplementary groups
//     from /etc/group; empty means root. A name that is not there fails
//     the run (exit 125, *StartError).
//   - The working directory is created when missing (as root); "/" when
//     unset. argv[0] without a slash is looked up in the process's PATH.
//     Not found is exit 127, not executable 126.
//   - The root is the image's filesystem read-only under an overlayfs whose
//     upper layer is tmpfs: the process can write anywhere, up to half
//     the VM's memory (tmpfs's default size); the writes vanish with the
//     VM; the image
//     file is attached read-only and never changes. /proc, /sys, /dev
//     (devtmpfs), /dev/pts and /dev/shm are mounted; /tmp and /run are the
//     image's own, as in Docker. /etc/hostname and /etc/hosts are written
//     for the hostname.
//   - stdin is /dev/null; there is no TTY. Only lo is up: no network.
//   - The process runs as the given user in its own session, with 2^20
//     open files. Root in the image is root of the VM, with all
//     capabilities: the VM is the isolation boundary.
//   - When the process exits, everything it left running is killed (like a
//     container's PID namespace) and the VM powers off. Exit codes are
//     the process's status, or 128+n when signal n killed it.
//   - Canceling ctx sends the image's StopSignal (default SIGTERM) to the
//     process; after Spec.StopTimeout (default 1s) the VM is killed, so a
//     canceled run ends within about StopTimeout plus a few milliseconds.
//
// # Boot
//
// The VM is the builder's (same kernel, same initramfs, same microvm
// launcher) with a different kernel command line and disks: Image.Cmdline
// plus "kiln.mode=run kiln.image=kiln-image quiet", one read-only
// virtio-blk disk with serial kiln-image (the image's erofs or ext4), and
// one virtio-serial port named kiln.run. The builder's root disk is not
// attached. "quiet" keeps boot messages off the emulated UART, which saves
// about 2 s per boot under TCG; errors still reach the console, whose tail
// is in every error about the VM.
//
// kiln-init (cmd/kiln-init/run.go) loads the modules as in build mode,
// opens the port, says hello, reads the spec, mounts the image disk and
// the overlay, moves /dev, /proc and /sys into it, frees the initramfs,
// moves the overlay onto / and chroots, then starts the process and stays
// PID 1 to reap and report.
//
// # Protocol (package proto)
//
// Frames both ways on the port: one kind byte, a 4-byte big-endian payload
// length (at most proto.MaxFrame), the payload. The guest speaks first,
// because a virtio-serial port drops what the host sends while the guest
// has it closed:
//
//	guest → host  'h' hello   {"proto":"kiln-run","version":1,"kernel":"6.1…"}
//	host → guest  's' spec    {"argv":[…],"env":[…],"workingDir":"/…","user":"…","hostname":"…"}
//	guest → host  'o' stdout  raw bytes, any number
//	guest → host  'e' stderr  raw bytes, any number
//	host → guest  'k' signal  {"signal":15}, at most one per cancel
//	guest → host  'x' exit    {"code":N,"signal":"SIGKILL","error":"…"}
//	host → guest  'a' ack     empty; the guest then syncs and reboots
//
// The exit frame follows all output: kiln-init sends it only after the
// process and everything it started are dead and both pipes reached EOF
// (bounded by 2 s). "error" is set only when the process could not be
// started; the host turns it into a *StartError. The guest waits for the
// ack (at most 5 s) before rebooting, because QEMU's exit closes the
// host's end of the port and could otherwise cut off the exit frame.
// Everything before the hello (a missing port) is reported only on the
// console ("kiln-init: FATAL: …") and the VM reboots; the host reports it
// with the console's tail. A builder image built before run mode boots
// into build mode instead and fails the same way: rebuild it.
//
// The process runs as root in the guest at will, so the host trusts
// nothing it receives: frame sizes are bounded, unknown frames end the
// run, and the VM is killed on every return path.
package runner
