// Package microvm launches QEMU microVMs (qemu-system-x86_64 -M microvm)
// for the builder runtime: it builds the command line, picks KVM or TCG,
// wires virtio-blk disks (found in the guest by serial) and virtio-serial
// ports (handed to the caller as connected unix sockets), captures the
// serial console, and stops QEMU reliably.
//
// Accelerator: ProbeAccel uses KVM only when /dev/kvm works and the
// nested kvm_pvm hypervisor is not loaded (stock kernels hang under it);
// otherwise TCG with a named CPU model (TCGCPU) and multi-threaded TCG,
// logged once with the reason. Under TCG the kernel is told the host's TSC frequency, measured
// once per process: on a busy host the guest cannot calibrate its timers
// and the boot hangs otherwise.
//
// A VM ends when the guest reboots (the kernel command line has reboot=t
// and QEMU runs with -no-reboot, so a reboot or panic exits QEMU at once),
// when Kill or Stop is called, or when the context given to Start is done.
// QEMU runs in its own process group with a parent-death signal; Wait
// returns only after it is reaped. Port sockets are removed as soon as
// QEMU has connected them, so a VM leaves nothing on the host.
package microvm
