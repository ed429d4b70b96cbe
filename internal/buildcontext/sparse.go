package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"hash"
	"os"
	"strings"
)

// isSparse reports whether hdr is a GNU sparse entry (old GNU format, or
// PAX GNU.sparse.* records of any version), whose holes archive/tar hands
// out as zeros.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// holeBlock is the unit sparseWriter leaves as a hole, the block size of
// the usual Linux filesystems.
const holeBlock = 4096

var zeroBlock [holeBlock]byte

// sparseWriter writes a sparse entry to f without writing its holes, and
// all of its logical content (holes as zeros) to h. archive/tar gives no
// way to seek over holes: Reader.writeTo, which would, is unexported
// (golang.org/issue/22735), and so is the sparse map; Read returns holes as
// zeros. So, as `cp --sparse=always` does, every block-aligned run of
// holeBlock zero bytes is skipped instead of written: the file reads back
// the same, and holes stay holes on disk. Zero blocks inside data
// fragments become holes too, which changes nothing that can be read.
type sparseWriter struct {
	ctx context.Context
	f   *os.File
	h   hash.Hash
	off int64 // logical bytes so far
}

func (w *sparseWriter) Write(p []byte) (int, error) {
	// archive/tar makes holes up without reading the upload, so the
	// upload reader's cancellation check never runs while one is copied.
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	w.h.Write(p)
	data := 0 // start of the part of p not yet written or skipped
	for i := 0; i < len(p); {
		n := min(holeBlock-int((w.off+int64(i))%holeBlock), len(p)-i)
		if n == holeBlock && bytes.Equal(p[i:i+n], zeroBlock[:]) {
			if data < i {
				if _, err := w.f.WriteAt(p[data:i], w.off+int64(data)); err != nil {
					return data, err
				}
			}
			data = i + n
		}
		i += n
	}
	if data < len(p) {
		if _, err := w.f.WriteAt(p[data:], w.off+int64(data)); err != nil {
			return data, err
		}
	}
	w.off += int64(len(p))
	return len(p), nil
}

// finish gives the file its full size, which it lacks if it ends in a hole.
func (w *sparseWriter) finish() error {
	return w.f.Truncate(w.off)
}
