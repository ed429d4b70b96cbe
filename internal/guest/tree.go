package guest

import (
	"archive/tar"
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The build context and Dockerfile dir travel as tar streams: regular
// files, directories and symlinks with mode, owner and mtime, because COPY
// puts all of those into image layers and a VM build must produce the
// same image as a process-runtime build of the same context.

// sendTree writes dir's contents to w as a tar stream.
func sendTree(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		var link string
		switch {
		case fi.Mode().IsRegular(), fi.IsDir():
		case fi.Mode()&fs.ModeSymlink != 0:
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s is a %s; a build context holds only files, directories and symlinks", rel, describeType(fi.Mode()))
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		// PAX keeps sub-second mtimes; access and change times are noise.
		hdr.Format = tar.FormatPAX
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		hdr.Uname, hdr.Gname = "", ""
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		// A file that changed size since the walk would corrupt the stream.
		if _, err := io.CopyN(tw, f, hdr.Size); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		return nil
	})
	if err != nil {
		return hidePaths(dir, err)
	}
	return tw.Close()
}

// hidePaths makes file errors name paths relative to dir: the message
// travels to the guest, which has no business knowing host paths.
func hidePaths(dir string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		rel, rerr := filepath.Rel(dir, pe.Path)
		if rerr != nil || strings.HasPrefix(rel, "..") {
			rel = filepath.Base(pe.Path)
		}
		return fmt.Errorf("%s %s: %w", pe.Op, rel, pe.Err)
	}
	return err
}

func describeType(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

// receiveTree unpacks a tar stream from sendTree into dir, which must exist
// and be empty. Nothing can be written outside dir: every path is resolved
// through an os.Root, so neither "../" names nor symlinks lead out.
func receiveTree(r io.Reader, dir string) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	type dirMeta struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirMeta
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read build context stream: %w", err)
		}
		name := path.Clean(hdr.Name)
		if !filepath.IsLocal(name) {
			return fmt.Errorf("build context entry %q points outside the context", hdr.Name)
		}
		name = filepath.FromSlash(name)
		if parent := filepath.Dir(name); parent != "." {
			if err := root.MkdirAll(parent, 0o755); err != nil {
				return err
			}
		}
		mode := hdr.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := root.Mkdir(name, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			if err := root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
			// Mode and mtime last: a read-only directory must still take
			// its entries, and creating them changes its mtime.
			dirs = append(dirs, dirMeta{name, mode, hdr.ModTime})
			continue
		case tar.TypeReg:
			f, err := root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
		case tar.TypeSymlink:
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return err
			}
			if err := root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
			continue
		default:
			return fmt.Errorf("build context entry %q has unsupported type %q", hdr.Name, hdr.Typeflag)
		}
		if err := root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return err
		}
		// After chown, which clears setuid/setgid bits.
		if err := root.Chmod(name, mode); err != nil {
			return err
		}
		if err := root.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
			return err
		}
	}
	// Deepest first, so setting a parent's mtime comes after its children
	// were touched.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := root.Chmod(d.name, d.mode); err != nil {
			return err
		}
		if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
			return err
		}
	}
	return nil
}

// A tree travels in chunks (4-byte big-endian length, then the bytes), ended
// by a zero length and a streamReply line. A tar stream alone cannot carry
// the sender's failure: cut off at an entry boundary it reads as a complete,
// smaller context.
type chunkWriter struct {
	w io.Writer
}

func (c *chunkWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(len(p)))
	if _, err := c.w.Write(hdr[:]); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// end writes the terminator carrying the sender's outcome.
func (c *chunkWriter) end(sendErr error) error {
	if _, err := c.w.Write(make([]byte, 4)); err != nil {
		return err
	}
	var r streamReply
	if sendErr != nil {
		r.Error = sendErr.Error()
	}
	return writeLine(c.w, r)
}

type chunkReader struct {
	r    io.Reader
	left uint32
	err  error // sticky: io.EOF after a clean end
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	if c.left == 0 {
		var hdr [4]byte
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			c.err = fmt.Errorf("transfer cut off: %w", io.ErrUnexpectedEOF)
			return 0, c.err
		}
		c.left = binary.BigEndian.Uint32(hdr[:])
		if c.left == 0 {
			var r streamReply
			if err := readJSONLine(c.r, &r); err != nil {
				c.err = fmt.Errorf("transfer cut off: %w", err)
			} else if r.Error != "" {
				c.err = fmt.Errorf("the host failed to send it: %s", r.Error)
			} else {
				c.err = io.EOF
			}
			return 0, c.err
		}
	}
	if uint32(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= uint32(n)
	if err != nil && n == 0 {
		c.err = fmt.Errorf("transfer cut off: %w", io.ErrUnexpectedEOF)
		return 0, c.err
	}
	return n, nil
}

// sendTreeChunked sends dir to w in chunks and ends with the outcome.
func sendTreeChunked(w io.Writer, dir string) error {
	cw := &chunkWriter{w: w}
	bw := bufio.NewWriterSize(cw, 256<<10)
	err := sendTree(bw, dir)
	if err == nil {
		err = bw.Flush()
	}
	if endErr := cw.end(err); err == nil {
		err = endErr
	}
	return err
}

// receiveTreeChunked unpacks a chunked tree into dir and returns the
// sender's failure, if any, over anything the unpacking noticed.
func receiveTreeChunked(r io.Reader, dir string) error {
	cr := &chunkReader{r: r}
	err := receiveTree(cr, dir)
	// The tar end marker comes before the terminator; read up to it.
	if _, derr := io.Copy(io.Discard, cr); derr != nil {
		return derr
	}
	return err
}
