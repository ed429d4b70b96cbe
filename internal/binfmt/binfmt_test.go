package binfmt

import (
	"encoding/hex"
	"slices"
	"testing"
)

// Registrations are known by the ELF header their magic matches under
// their mask, whatever they are named: Debian's qemu-aarch64 and
// qemu-arm magics give their platforms, one masked to another machine or
// not ELF at all gives none.
func TestELFPlatformsReadsTheMagicUnderItsMask(t *testing.T) {
	hx := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	aarch64 := hx("7f454c460201010000000000000000000200b700")
	aarch64Mask := hx("ffffffffffffff00fffffffffffffffffeffffff")
	arm := hx("7f454c4601010100000000000000000002002800")
	s390x := hx("7f454c4602020100000000000000000000020016")
	for _, c := range []struct {
		name        string
		magic, mask []byte
		want        []string
	}{
		{"aarch64 with its mask", aarch64, aarch64Mask, []string{"linux/arm64"}},
		{"aarch64 without a mask", aarch64, nil, []string{"linux/arm64"}},
		{"arm", arm, nil, []string{"linux/arm/v6", "linux/arm/v7"}},
		{"s390x, big-endian", s390x, nil, []string{"linux/s390x"}},
		{"a mask that drops the machine", aarch64, hx("ffffffffffffff00ffffffffffffffffffff0000"), nil},
		{"not ELF", hx("4d5a9000030000000400000000000000b8000000"), nil, nil},
		{"too short", aarch64[:10], nil, nil},
	} {
		if got := ELFPlatforms(c.magic, c.mask); !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
