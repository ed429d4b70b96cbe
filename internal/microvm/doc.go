// Package microvm launches QEMU microVMs (qemu-system-x86_64 -M microvm)
// for the builder runtime: it builds the command line, picks KVM or TCG,
// wires virtio-blk disks (found in the guest by serial) and virtio-serial
// ports (handed to the caller as connected unix sockets), captures the
// serial console, and stops QEMU reliably.
//
// A VM ends when the guest reboots (the kernel command line has reboot=t
// and QEMU runs with -no-reboot, so a reboot or panic exits QEMU at once),
// when Kill or Stop is called, or when the context given to Start is done.
// Wait returns only after QEMU is reaped; its port sockets are removed as
// soon as QEMU has connected them, so a VM leaves nothing on the host.
package microvm
