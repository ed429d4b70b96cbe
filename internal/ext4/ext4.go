// Package ext4 reads the few fields of an ext4 superblock kiln acts on:
// how full a cache volume is, whether the kernel recorded errors in it,
// and whether it was left mounted when its machine died.
package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Superblock holds the fields kiln reads. The kernel writes the free
// counts back on unmount and sync, so for an idle volume they are exact;
// for an attached one they are as of its last commit.
type Superblock struct {
	Blocks    uint64
	Free      uint64
	BlockSize int64
	// HasErrors: the kernel found the filesystem inconsistent.
	HasErrors bool
	// NeedsRecovery: the journal holds transactions to replay, i.e. the
	// filesystem was mounted when its machine died or was killed. What
	// was in that machine's page cache never reached the disk.
	NeedsRecovery bool
}

// UsedBytes is what the filesystem holds.
func (s Superblock) UsedBytes() int64 { return int64(s.Blocks-s.Free) * s.BlockSize }

const (
	sbOffset        = 1024
	magic           = 0xEF53
	incompatRecover = 0x4
	incompat64bit   = 0x80
	stateErrorFS    = 0x2
)

// ReadSuperblock reads the superblock of the ext4 filesystem in path, an
// image file or a block device.
func ReadSuperblock(path string) (Superblock, error) {
	f, err := os.Open(path)
	if err != nil {
		return Superblock{}, err
	}
	defer f.Close()
	buf := make([]byte, 1024)
	if _, err := f.ReadAt(buf, sbOffset); err != nil {
		if errors.Is(err, io.EOF) {
			return Superblock{}, fmt.Errorf("read ext4 superblock of %s: file too short", path)
		}
		return Superblock{}, fmt.Errorf("read ext4 superblock of %s: %w", path, err)
	}
	le := binary.LittleEndian
	if m := le.Uint16(buf[0x38:]); m != magic {
		return Superblock{}, fmt.Errorf("%s is not an ext4 filesystem (superblock magic %#04x)", path, m)
	}
	logBS := le.Uint32(buf[0x18:])
	if logBS > 6 {
		return Superblock{}, fmt.Errorf("ext4 superblock of %s: implausible block size 1024<<%d", path, logBS)
	}
	incompat := le.Uint32(buf[0x60:])
	sb := Superblock{
		Blocks:        uint64(le.Uint32(buf[0x04:])),
		Free:          uint64(le.Uint32(buf[0x0C:])),
		BlockSize:     1024 << logBS,
		HasErrors:     le.Uint16(buf[0x3A:])&stateErrorFS != 0,
		NeedsRecovery: incompat&incompatRecover != 0,
	}
	if incompat&incompat64bit != 0 {
		sb.Blocks |= uint64(le.Uint32(buf[0x150:])) << 32
		sb.Free |= uint64(le.Uint32(buf[0x158:])) << 32
	}
	if sb.Free > sb.Blocks {
		return Superblock{}, fmt.Errorf("ext4 superblock of %s: free blocks %d exceed block count %d", path, sb.Free, sb.Blocks)
	}
	return sb, nil
}
