package buildcontext

import (
	"archive/tar"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// Manifest describes a build context by content instead of by bytes: the
// CLI sends it with only the blobs the server lacks, and the server
// materializes the tree from its content store (Materialize). A context
// sent as a Manifest and the same context sent as a tar get the same
// Info.Hash, so they deduplicate against each other.
//
// JSON, as sent in the multipart field "context_manifest":
//
//	{"version": 1, "entries": [
//	  {"path": "src", "type": "dir", "mode": 493},
//	  {"path": "src/main.go", "type": "file", "mode": 420, "size": 1234, "digest": "sha256:…"},
//	  {"path": "src/link", "type": "symlink", "target": "main.go"},
//	  {"path": "src/copy.go", "type": "hardlink", "target": "src/main.go"}
//	]}
//
// Paths are slash-separated, relative to the context root, clean, without
// "./" or a trailing slash. Parents need not be listed (they are made with
// mode 0755, as Receive does for a tar). Entries follow the tar rules of
// Receive: no path twice, nothing beneath a symlink, symlink targets that
// stay inside the context, hard links to a file listed earlier.
type Manifest struct {
	Version int             `json:"version"`
	Entries []ManifestEntry `json:"entries"`
}

// ManifestVersion is the only Manifest.Version this kiln reads.
const ManifestVersion = 1

// ManifestEntry is one path of a Manifest.
type ManifestEntry struct {
	Path string `json:"path"`
	// Type is EntryFile, EntryDir, EntrySymlink or EntryHardlink.
	Type string `json:"type"`
	// Mode holds the permission bits, plus 0o1000 (sticky) on directories.
	Mode uint32 `json:"mode,omitempty"`
	// Size and Digest ("sha256:<hex>") describe a file's content.
	Size   int64  `json:"size,omitempty"`
	Digest string `json:"digest,omitempty"`
	// Target is a symlink's target as on disk, or the context path a hard
	// link shares its inode with.
	Target string `json:"target,omitempty"`
}

// Manifest entry types.
const (
	EntryFile     = "file"
	EntryDir      = "dir"
	EntrySymlink  = "symlink"
	EntryHardlink = "hardlink"
)

// FormatManifest is Info.Format of a context materialized from a Manifest.
const FormatManifest = "manifest"

// BlobSource gives Materialize the files to hard-link into a context: for
// a content digest and permission bits, the path of a file with exactly
// that content and mode, and ContentTime(digest) as its mtime. Such a file
// must never be written again, since every context linking it shares it.
type BlobSource interface {
	BlobFile(digest string, mode uint32) (path string, size int64, err error)
}

// ErrMissingBlobs means a manifest names content the store does not hold
// (never sent, or evicted since the client asked): send it and retry.
var ErrMissingBlobs = errdefs.Sentinel(errdefs.ErrMissingContent, "the context names blobs the kiln server does not have")

// Materialize builds the context m describes in dir from blobs, under the
// same rules, limits and errors as Receive, and returns the same Info a tar
// of that tree would give (Format FormatManifest; Bytes and
// UncompressedBytes are the content's size). Files are hard links to the
// blobs, so nothing is copied. A blob BlobFile cannot find fails with an
// *Error wrapping ErrMissingBlobs.
func Materialize(ctx context.Context, m Manifest, blobs BlobSource, dir string, lim Limits) (info Info, err error) {
	if err := ctx.Err(); err != nil {
		return Info{}, canceled(err)
	}
	if m.Version != ManifestVersion {
		return Info{}, badInput("context manifest version %d is not supported (this kiln reads version %d); use a kiln CLI of the server's version", m.Version, ManifestVersion)
	}
	if lim.MaxEntries > 0 && len(m.Entries) > lim.MaxEntries {
		return Info{}, tooLarge("the context has more than %d entries; the server's limit is %s = %d: remove files or add them to .dockerignore", lim.MaxEntries, keyMaxEntries, lim.MaxEntries)
	}
	if err := makeTargetDir(dir); err != nil {
		return Info{}, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		_ = removeTree(dir)
		return Info{}, serverFault(err, "opening the build context directory failed")
	}
	x := &extractor{ctx: ctx, root: root, lim: lim, nodes: map[string]*node{".": {typ: typeDir}}, blobs: blobs}
	defer func() {
		x.closeSubRoot()
		closeErr := root.Close()
		if err == nil && closeErr != nil {
			err = serverFault(closeErr, "closing the build context directory failed")
		}
		if err != nil {
			var ce *Error
			if !errors.As(err, &ce) {
				err = serverFault(err, "materializing the build context failed")
			}
			_ = removeTree(dir)
			info = Info{}
		}
	}()
	for i, e := range m.Entries {
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				return Info{}, canceled(err)
			}
		}
		hdr := &tar.Header{Name: e.Path, Mode: int64(e.Mode), Size: e.Size, Linkname: e.Target}
		switch e.Type {
		case EntryFile:
			hdr.Typeflag = tar.TypeReg
		case EntryDir:
			hdr.Typeflag = tar.TypeDir
		case EntrySymlink:
			hdr.Typeflag = tar.TypeSymlink
		case EntryHardlink:
			hdr.Typeflag = tar.TypeLink
		default:
			return Info{}, badInput("context manifest entry %q has type %q; want file, dir, symlink or hardlink", e.Path, e.Type)
		}
		x.digest = e.Digest
		if err := x.entry(hdr, nil); err != nil {
			return Info{}, err
		}
	}
	info, err = x.finish()
	if err != nil {
		return Info{}, err
	}
	info.Bytes, info.UncompressedBytes, info.Entries, info.Format = x.data, x.data, len(m.Entries), FormatManifest
	return info, nil
}

// linkBlob makes name a hard link to the blob of the current entry.
func (x *extractor) linkBlob(dirRoot *os.Root, base, name string, hdr *tar.Header, mode uint32) error {
	sum, ok := parseDigest(x.digest)
	if !ok {
		return badInput("context manifest entry %q has digest %q; want sha256:<64 hex digits>", hdr.Name, x.digest)
	}
	src, size, err := x.blobs.BlobFile(x.digest, mode)
	if errors.Is(err, ErrMissingBlobs) {
		return &Error{Class: errdefs.ErrMissingContent, Msg: fmt.Sprintf("the kiln server does not have the content of %q (%s): upload it and submit again (kiln build does this by itself)", hdr.Name, x.digest), err: err}
	}
	if err != nil {
		return x.fsFault(err, hdr.Name)
	}
	if size != hdr.Size {
		return badInput("context manifest entry %q says %d bytes, but its content %s has %d; re-create the manifest", hdr.Name, hdr.Size, x.digest, size)
	}
	d, err := dirRoot.Open(".")
	if err != nil {
		return x.fsFault(err, hdr.Name)
	}
	defer d.Close()
	// linkat relative to the directory handle: the os.Root already made
	// sure nothing on the way is a symlink.
	err = unix.Linkat(unix.AT_FDCWD, src, int(d.Fd()), base, 0)
	if errors.Is(err, unix.EMLINK) {
		// A blob shared by more paths than the filesystem allows links
		// (an empty file, tens of thousands of times): copy it instead.
		err = CopyFile(dirRoot, base, src, mode)
	}
	if err != nil {
		return x.fsFault(&os.LinkError{Op: "link", Old: src, New: hdr.Name, Err: err}, hdr.Name)
	}
	x.inodes++
	x.nodes[name] = &node{typ: typeFile, mode: mode, ino: x.inodes, sum: sum}
	return nil
}

// parseDigest reads "sha256:<64 lowercase hex>".
func parseDigest(d string) (sum [32]byte, ok bool) {
	h, found := strings.CutPrefix(d, "sha256:")
	if !found || len(h) != 64 || strings.ToLower(h) != h {
		return sum, false
	}
	if _, err := hex.Decode(sum[:], []byte(h)); err != nil {
		return sum, false
	}
	return sum, true
}

// CopyFile writes a copy of the file src at name in dir (which must not
// exist yet) with mode and src's mtime: a blob's file where a hard link
// will not do.
func CopyFile(dir *os.Root, name, src string, mode uint32) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := dir.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Chmod(os.FileMode(mode))
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = dir.Chtimes(name, fi.ModTime(), fi.ModTime())
	}
	return err
}
