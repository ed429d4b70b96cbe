package microvm

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Accel is how QEMU runs guest code.
type Accel string

const (
	// AccelAuto probes once per process: KVM when usable, else TCG.
	AccelAuto Accel = ""
	AccelKVM  Accel = "kvm"
	// AccelTCG is QEMU's software emulation: works everywhere, roughly
	// 10-20x slower than KVM for builds.
	AccelTCG Accel = "tcg"
)

// ioctl numbers from linux/kvm.h (_IO(KVMIO, n), KVMIO = 0xAE).
const (
	kvmGetAPIVersion = 0xAE00
	kvmCreateVM      = 0xAE01
	kvmAPIVersion    = 12
)

var (
	probeOnce   sync.Once
	probeAccel  Accel
	probeReason string
)

// ProbeAccel decides between KVM and TCG and says why. The result is
// computed once per process.
//
// The decision is static so it costs no boot: KVM is used when /dev/kvm
// opens read-write, speaks API version 12 and creates a VM, unless the
// kvm_pvm module is loaded. kvm_pvm is the nested "pagetable virtual
// machine" hypervisor some cloud sandboxes expose as /dev/kvm: it passes
// all of those checks, but a stock distribution kernel spins forever
// under it (and -cpu host fails on MSR 0x10a), so booting must not be
// attempted. Anyone who knows better can set Config.Accel explicitly.
func ProbeAccel() (Accel, string) {
	probeOnce.Do(func() {
		probeAccel, probeReason = probe("/dev/kvm", "/sys/module/kvm_pvm")
	})
	return probeAccel, probeReason
}

func probe(devKVM, pvmModule string) (Accel, string) {
	if _, err := os.Stat(pvmModule); err == nil {
		return AccelTCG, "the kvm_pvm module is loaded (nested PVM virtualization); stock guest kernels hang under it"
	}
	fd, err := unix.Open(devKVM, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return AccelTCG, devKVM + " does not exist (no hardware virtualization, or the kvm module is not loaded)"
		}
		return AccelTCG, fmt.Sprintf("cannot open %s: %v (is this user in the kvm group?)", devKVM, err)
	}
	defer unix.Close(fd)
	v, err := ioctl(fd, kvmGetAPIVersion)
	if err != nil || v != kvmAPIVersion {
		return AccelTCG, fmt.Sprintf("%s reports API version %d (%v), want %d", devKVM, v, err, kvmAPIVersion)
	}
	vm, err := ioctl(fd, kvmCreateVM)
	if err != nil {
		return AccelTCG, fmt.Sprintf("%s cannot create a VM: %v", devKVM, err)
	}
	unix.Close(int(vm))
	return AccelKVM, devKVM + " works"
}

func ioctl(fd int, req uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, 0)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
