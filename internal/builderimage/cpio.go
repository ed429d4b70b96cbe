package builderimage

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
)

// cpioEntry is one file of the initramfs. Paths are relative, without a
// leading slash ("kiln/modules/ext4.ko").
type cpioEntry struct {
	Path  string
	Mode  fs.FileMode // permission bits plus fs.ModeDir / fs.ModeCharDevice
	Data  []byte
	Major uint32 // device number for character devices
	Minor uint32
}

// writeCpio writes entries as an uncompressed newc archive, the format
// the kernel unpacks into its rootfs. Entries are sorted, parents come
// first, and owner, mtime and inode numbers are fixed, so the same
// entries always give the same bytes. It stays uncompressed on purpose:
// the archive is a few MB and decompressing it costs more boot time under
// TCG than reading it.
func writeCpio(w io.Writer, entries []cpioEntry) error {
	sorted := append([]cpioEntry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Path < sorted[j].Path })
	seen := map[string]bool{}
	ino := uint32(1)
	cw := &countWriter{w: w}
	for _, e := range sorted {
		p := strings.TrimPrefix(path.Clean(e.Path), "/")
		if p == "" || p == "." || seen[p] {
			return fmt.Errorf("initramfs: bad or duplicate path %q", e.Path)
		}
		if dir := path.Dir(p); dir != "." && !seen[dir] {
			return fmt.Errorf("initramfs: %s comes without its directory %s", p, dir)
		}
		seen[p] = true
		mode := uint32(e.Mode.Perm())
		nlink := uint32(1)
		switch {
		case e.Mode.IsDir():
			mode |= 0o040000
			nlink = 2
		case e.Mode&fs.ModeCharDevice != 0:
			mode |= 0o020000
		case e.Mode.IsRegular():
			mode |= 0o100000
		default:
			return fmt.Errorf("initramfs: %s has unsupported mode %s", p, e.Mode)
		}
		if err := cpioRecord(cw, p, ino, mode, nlink, e.Major, e.Minor, e.Data); err != nil {
			return err
		}
		ino++
	}
	if err := cpioRecord(cw, "TRAILER!!!", 0, 0, 1, 0, 0, nil); err != nil {
		return err
	}
	return cw.err
}

func cpioRecord(w *countWriter, name string, ino, mode, nlink, major, minor uint32, data []byte) error {
	fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, major, minor, len(name)+1, 0)
	io.WriteString(w, name)
	w.Write([]byte{0})
	w.pad4()
	w.Write(data)
	w.pad4()
	return w.err
}

type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

func (c *countWriter) pad4() {
	if r := c.n % 4; r != 0 {
		c.Write(make([]byte, 4-r))
	}
}
