// Package builderimage assembles the builder VM image from what is
// installed on the machine and kiln's own source, and reads it back.
//
// Build writes four files into one directory:
//
//	vmlinux         the Debian kernel (linux-image-amd64), uncompressed from
//	                /boot/vmlinuz-<version> in Go (xz: LZMA2 + x86 BCJ).
//	                An ELF with a PVH entry note: QEMU boots it directly,
//	                ~3 s faster per boot under TCG than the bzImage.
//	initramfs.cpio  uncompressed newc archive: /init (cmd/kiln-init, static
//	                Go), /kiln/modules/*.ko (decompressed) and
//	                /kiln/modules.order, /dev/console.
//	rootfs.erofs    read-only root: /usr/bin/kiln-agent and /usr/bin/buildkitd
//	                (both static Go, CGO_ENABLED=0), /usr/sbin/runc with its
//	                loader and libraries (from its ELF DT_NEEDED closure),
//	                QEMU user-mode emulators /usr/bin/qemu-<arch>-static
//	                (Debian's qemu-user-static, static; DefaultEmulators:
//	                aarch64, arm, riscv64, ppc64le, s390x, ~11 MB each) with
//	                one binfmt_misc registration line each in
//	                /usr/lib/binfmt.d/qemu-<arch>.conf (emulate.go),
//	                merged-/usr symlinks, a minimal /etc, the CA bundle and
//	                empty mount points.
//	manifest.json   Manifest: digests, sizes, kernel version, modules,
//	                component versions, the kernel arguments the image needs,
//	                the platforms it builds: Native (linux/amd64, linux/386)
//	                and Emulates (linux/arm64, linux/arm/v6, linux/arm/v7,
//	                linux/ppc64le, linux/riscv64, linux/s390x).
//
// The same inputs give byte-identical files: Go binaries are built with
// -trimpath, no VCS stamp and an empty build ID; the cpio has fixed
// owners, mtimes and inode numbers; mkfs.erofs runs with -T0 --all-root,
// no xattrs and a UUID derived from the inputs. Manifest.Digest is
// sha256 over "vmlinux <sha256>\ninitramfs.cpio <sha256>\nrootfs.erofs
// <sha256>\n" and identifies the image (for example in a build's dedup
// key). Build skips all work when the directory already holds an image
// with the same InputsDigest.
//
// # Boot contract
//
// This is what the vm runtime (internal/runtime/vm), the host↔guest
// channel (internal/guest) and the agent (cmd/kiln-agent) may rely on.
// FormatVersion changes when any of it changes.
//
// Host side (internal/microvm does all of this):
//   - qemu-system-x86_64 -M microvm with ACPI on (the Debian kernel finds
//     virtio-mmio devices only through ACPI), -no-reboot, -kernel vmlinux,
//     -initrd initramfs.cpio.
//   - Kernel command line: microvm.BaseCmdline ("console=ttyS0 reboot=t
//     panic=-1"), then Manifest.Cmdline ("kiln.root=kiln-root"). Optional:
//     kiln.agent=<path> runs another agent binary from the root.
//   - Disks are virtio-blk-device with serial=: the root image read-only
//     with serial RootSerial ("kiln-root"); the build's ext4 cache volume
//     read-write with serial CacheSerial ("kiln-cache"). Order does not
//     matter.
//   - One virtio-serial port named AgentPort ("kiln.0") is the host↔agent
//     channel; the host end is a connected unix socket (microvm.VM.Port).
//
// Guest side, done by /init before the agent starts:
//   - Modules from Manifest.Modules are loaded in order (virtio, virtio_blk,
//     ext4 and its dependencies, erofs, overlay, virtio_net,
//     virtio_console, binfmt_misc). ext4, overlayfs and virtio_net are
//     ready for the agent; nothing is configured on them.
//   - The root disk is mounted read-only (erofs) at /, with tmpfs on /run
//     and /tmp (RAM-backed: they count against the VM's memory), devtmpfs
//     on /dev, devpts on /dev/pts, tmpfs on /dev/shm, proc, sysfs and
//     cgroup2 on /sys/fs/cgroup. The initramfs is freed; runc can
//     pivot_root because / is a real filesystem.
//   - Hostname is kiln-builder; lo is up; no other network is configured.
//     /etc/resolv.conf is a symlink to /run/resolv.conf, /var/tmp to /tmp;
//     everything else under / is read-only.
//   - binfmt_misc is mounted at /proc/sys/fs/binfmt_misc and every line of
//     /usr/lib/binfmt.d/*.conf is registered: Debian's magic and mask, the
//     emulator's path in the root and flags POCF (BinfmtFlags). F makes
//     the kernel open the emulator at registration, so foreign binaries
//     run inside build containers, whose roots have no emulator; this
//     happens before the agent starts because buildkitd probes binfmt_misc
//     once, at its start, for the platforms its worker reports. A failed
//     registration does not stop the boot: /init prints it on the console
//     and writes it to /run/kiln-binfmt.err, and the agent refuses jobs for
//     foreign platforms with it; linux/amd64 builds as before.
//   - /init runs /usr/bin/kiln-agent as root with all capabilities, cwd /,
//     PATH=/usr/sbin:/usr/bin:/sbin:/bin, HOME=/root, stdin/stdout/stderr
//     on the serial console, in its own session. /init stays PID 1: it
//     reaps orphans (runc, build steps), and when the agent exits, for any
//     reason, it prints the exit status on the console, syncs and reboots,
//     which ends QEMU. A failing /init prints "kiln-init: FATAL: ..." on
//     the console and does the same.
//
// What the agent does:
//   - Find the channel: the directory under /sys/class/virtio-ports whose
//     "name" file says kiln.0 names the device (/dev/vportNpM; there is no
//     udev, so no /dev/virtio-ports). Open it once, read-write, and keep it
//     open: the host's writes while it is closed are dropped.
//   - Find disks by /sys/block/vd*/serial; mount the cache volume (ext4)
//     at CacheMountPoint (/var/lib/buildkit), then start /usr/bin/buildkitd
//     (it finds runc on PATH; --oci-worker-net host avoids needing a
//     bridge).
//   - To end the VM, exit, or call reboot(LINUX_REBOOT_CMD_RESTART).
//     Do not power off: with ACPI on, an ACPI power-off can spin.
//
// The placeholder agent in cmd/kiln-agent only writes "kiln-agent ready
// <kernel version> <MemTotal MiB>\n" to the channel and reboots.
package builderimage
