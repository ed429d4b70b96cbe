// Package binfmt knows which platforms a binfmt_misc registration runs,
// from the ELF header its magic matches: the builder image checks the
// registrations it writes for its emulators with it, and the process
// runtime finds the host's usable handlers with it, whatever registered
// them (qemu-user-static, binfmt-support, tonistiigi/binfmt).
package binfmt

import (
	"debug/elf"
	"encoding/binary"
)

// ELFPlatforms returns the OCI platforms whose executables a registration
// with this magic (the first bytes of an ELF header, at offset 0) and
// mask (nil: every bit counts) matches, or nil when it matches no ELF
// executable kiln knows.
func ELFPlatforms(magic, mask []byte) []string {
	if len(magic) < 20 {
		return nil
	}
	hdr := append([]byte(nil), magic[:20]...)
	if len(mask) >= 20 {
		for i := range hdr {
			hdr[i] &= mask[i]
		}
	}
	if string(hdr[:4]) != elf.ELFMAG {
		return nil
	}
	k := elfKey{class: elf.Class(hdr[elf.EI_CLASS]), data: elf.Data(hdr[elf.EI_DATA])}
	switch k.data {
	case elf.ELFDATA2LSB:
		k.machine = elf.Machine(binary.LittleEndian.Uint16(hdr[18:20]))
	case elf.ELFDATA2MSB:
		k.machine = elf.Machine(binary.BigEndian.Uint16(hdr[18:20]))
	default:
		return nil
	}
	return elfPlatforms[k]
}

type elfKey struct {
	class   elf.Class
	data    elf.Data
	machine elf.Machine
}

var (
	c32, c64 = elf.ELFCLASS32, elf.ELFCLASS64
	lsb, msb = elf.ELFDATA2LSB, elf.ELFDATA2MSB

	// elfPlatforms maps an ELF executable's class, byte order and
	// machine to the OCI platforms whose images hold such executables.
	elfPlatforms = map[elfKey][]string{
		{c64, lsb, elf.EM_X86_64}:    {"linux/amd64"},
		{c32, lsb, elf.EM_386}:       {"linux/386"},
		{c64, lsb, elf.EM_AARCH64}:   {"linux/arm64"},
		{c32, lsb, elf.EM_ARM}:       {"linux/arm/v6", "linux/arm/v7"},
		{c64, lsb, elf.EM_RISCV}:     {"linux/riscv64"},
		{c64, lsb, elf.EM_PPC64}:     {"linux/ppc64le"},
		{c64, msb, elf.EM_PPC64}:     {"linux/ppc64"},
		{c64, msb, elf.EM_S390}:      {"linux/s390x"},
		{c64, lsb, elf.EM_MIPS}:      {"linux/mips64le"},
		{c64, msb, elf.EM_MIPS}:      {"linux/mips64"},
		{c64, lsb, elf.EM_LOONGARCH}: {"linux/loong64"},
	}
)
