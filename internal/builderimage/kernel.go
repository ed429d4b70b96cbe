package builderimage

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ulikunitz/xz/lzma"
)

// xzMagic starts an xz stream; the Debian bzImage carries its vmlinux as
// one (CONFIG_KERNEL_XZ).
var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// findKernel picks the kernel to boot: the requested version, or the
// newest /boot/vmlinuz-* whose modules are installed.
func findKernel(bootDir, modulesDir, version string) (string, error) {
	if version != "" {
		p := filepath.Join(bootDir, "vmlinuz-"+version)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("kernel %s not found at %s: %w; install it with `apt-get install -y linux-image-amd64`", version, p, err)
		}
		if _, err := os.Stat(filepath.Join(modulesDir, version)); err != nil {
			return "", fmt.Errorf("kernel %s has no modules in %s: %w; reinstall linux-image-%s", version, modulesDir, err, version)
		}
		return version, nil
	}
	paths, _ := filepath.Glob(filepath.Join(bootDir, "vmlinuz-*"))
	var versions []string
	for _, p := range paths {
		v := strings.TrimPrefix(filepath.Base(p), "vmlinuz-")
		if _, err := os.Stat(filepath.Join(modulesDir, v, "modules.dep")); err == nil {
			versions = append(versions, v)
		}
	}
	if len(versions) == 0 {
		return "", fmt.Errorf("no kernel with modules in %s and %s; install one with `apt-get install -y linux-image-amd64`", bootDir, modulesDir)
	}
	sort.Slice(versions, func(i, j int) bool { return versionLess(versions[i], versions[j]) })
	return versions[len(versions)-1], nil
}

// versionLess orders kernel versions like "6.1.0-9-amd64" < "6.1.0-56-amd64"
// by comparing digit runs numerically.
func versionLess(a, b string) bool {
	for a != "" && b != "" {
		da, ra := leadingDigits(a)
		db, rb := leadingDigits(b)
		if da != "" && db != "" {
			if len(da) != len(db) {
				return len(da) < len(db)
			}
			if da != db {
				return da < db
			}
			a, b = ra, rb
			continue
		}
		if a[0] != b[0] {
			return a[0] < b[0]
		}
		a, b = a[1:], b[1:]
	}
	return len(a) < len(b)
}

func leadingDigits(s string) (digits, rest string) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	d := strings.TrimLeft(s[:i], "0")
	if i > 0 && d == "" {
		d = "0"
	}
	return d, s[i:]
}

// extractVmlinux returns the uncompressed ELF kernel inside a bzImage.
// QEMU boots it through its PVH entry point, which skips the in-guest
// decompression: about 3 s per boot under TCG.
func extractVmlinux(bzImage []byte, version string) ([]byte, error) {
	var lastErr error
	for off := 0; ; {
		i := bytes.Index(bzImage[off:], xzMagic)
		if i < 0 {
			break
		}
		off += i
		out, err := decodeXZKernel(bzImage[off:])
		if err == nil {
			if err := checkVmlinux(out, version); err != nil {
				return nil, err
			}
			return out, nil
		}
		lastErr = err
		off += len(xzMagic)
	}
	if lastErr != nil {
		return nil, fmt.Errorf("decompress the kernel's xz payload: %w", lastErr)
	}
	return nil, errors.New("no xz payload in the kernel image; only xz-compressed kernels (Debian's linux-image-amd64) are supported")
}

func checkVmlinux(b []byte, version string) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("extracted kernel is not an ELF file: %w", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("extracted kernel is for %s, want x86-64", f.Machine)
	}
	if version != "" && !bytes.Contains(b, []byte("Linux version "+version+" ")) {
		return fmt.Errorf("extracted kernel does not say %q; /boot and /lib/modules disagree", "Linux version "+version)
	}
	return nil
}

// decodeXZKernel decodes the single-block xz stream the kernel build
// writes (xz --check=crc32 --x86 --lzma2). Go's xz readers handle only
// the LZMA2 filter, so this parses the container itself, runs LZMA2 and
// then undoes the x86 BCJ filter, and verifies the block's CRC32.
func decodeXZKernel(b []byte) ([]byte, error) {
	if len(b) < 12+8 {
		return nil, errors.New("xz stream too short")
	}
	flags := b[6:8]
	if crc32.ChecksumIEEE(flags) != binary.LittleEndian.Uint32(b[8:12]) {
		return nil, errors.New("xz stream header CRC mismatch")
	}
	checkType := flags[1] & 0x0F
	if flags[0] != 0 || (checkType != 0x00 && checkType != 0x01) {
		return nil, fmt.Errorf("unsupported xz stream flags %#x (want check none or CRC32)", flags)
	}
	blk := b[12:]
	hdrSize := (int(blk[0]) + 1) * 4
	if blk[0] == 0 || len(blk) < hdrSize {
		return nil, errors.New("xz stream has no block")
	}
	hdr := blk[:hdrSize]
	if crc32.ChecksumIEEE(hdr[:hdrSize-4]) != binary.LittleEndian.Uint32(hdr[hdrSize-4:]) {
		return nil, errors.New("xz block header CRC mismatch")
	}
	bflags := hdr[1]
	p := 2
	// Compressed and uncompressed sizes are optional; skip them.
	for _, present := range []bool{bflags&0x40 != 0, bflags&0x80 != 0} {
		if present {
			_, n := binary.Uvarint(hdr[p:])
			if n <= 0 {
				return nil, errors.New("bad xz block size field")
			}
			p += n
		}
	}
	bcj := false
	dictCap := 0
	for i := 0; i < int(bflags&0x03)+1; i++ {
		id, n := binary.Uvarint(hdr[p:])
		if n <= 0 {
			return nil, errors.New("bad xz filter id")
		}
		p += n
		size, n := binary.Uvarint(hdr[p:])
		if n <= 0 || p+n+int(size) > hdrSize-4 {
			return nil, errors.New("bad xz filter properties")
		}
		p += n
		props := hdr[p : p+int(size)]
		p += int(size)
		switch id {
		case 0x04: // x86 BCJ
			if len(props) != 0 {
				return nil, errors.New("x86 BCJ filter with a start offset is not supported")
			}
			bcj = true
		case 0x21: // LZMA2
			if len(props) != 1 {
				return nil, errors.New("bad LZMA2 properties")
			}
			dc, err := lzma.DecodeDictCap(props[0])
			if err != nil {
				return nil, fmt.Errorf("LZMA2 dictionary size: %w", err)
			}
			dictCap = int(dc)
		default:
			return nil, fmt.Errorf("unsupported xz filter %#x", id)
		}
	}
	if dictCap == 0 {
		return nil, errors.New("xz block has no LZMA2 filter")
	}
	src := &countingReader{r: bytes.NewReader(blk[hdrSize:])}
	lr, err := lzma.Reader2Config{DictCap: dictCap}.NewReader2(src)
	if err != nil {
		return nil, fmt.Errorf("start LZMA2: %w", err)
	}
	var out bytes.Buffer
	out.Grow(8 * len(b))
	if _, err := io.Copy(&out, lr); err != nil {
		return nil, fmt.Errorf("LZMA2: %w", err)
	}
	data := out.Bytes()
	if bcj {
		bcjX86Decode(data)
	}
	// The check covers the original data, so it is verified after the
	// BCJ filter has been undone.
	if checkType == 0x01 {
		end := hdrSize + int(src.n)
		end += (4 - end%4) % 4 // block padding
		if len(blk) < end+4 {
			return nil, errors.New("xz block truncated before its check")
		}
		if crc32.ChecksumIEEE(data) != binary.LittleEndian.Uint32(blk[end:end+4]) {
			return nil, errors.New("xz block CRC32 mismatch: the kernel image is corrupt")
		}
	}
	return data, nil
}

// countingReader counts bytes handed to the LZMA2 decoder, which reads
// exactly up to its end marker, so the block's check can be located.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// bcjX86Decode undoes the x86 branch-call-jump filter in place over a
// whole buffer that started at stream offset 0 (xz-embedded's bcj_x86).
func bcjX86Decode(buf []byte) {
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	bitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	msb := func(b byte) bool { return b == 0x00 || b == 0xFF }
	if len(buf) <= 4 {
		return
	}
	size := len(buf) - 4
	prevPos := -1
	var prevMask uint32
	for i := 0; i < size; i++ {
		if buf[i]&0xFE != 0xE8 {
			continue
		}
		d := i - prevPos
		if d > 3 {
			prevMask = 0
		} else {
			prevMask = (prevMask << (d - 1)) & 7
			if prevMask != 0 {
				b := buf[i+4-int(bitNum[prevMask])]
				if !allowed[prevMask] || msb(b) {
					prevPos = i
					prevMask = prevMask<<1 | 1
					continue
				}
			}
		}
		prevPos = i
		if !msb(buf[i+4]) {
			prevMask = prevMask<<1 | 1
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = src - uint32(i+5)
			if prevMask == 0 {
				break
			}
			j := bitNum[prevMask] * 8
			if !msb(byte(dest >> (24 - j))) {
				break
			}
			src = dest ^ (1<<(32-j) - 1)
		}
		dest &= 0x01FFFFFF
		dest |= 0 - (dest & 0x01000000)
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 4
	}
}
