package rootfs

import (
	"archive/tar"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// ExportTar writes the flattened filesystem of image dgst (its layers
// applied per the OCI spec, as for a conversion) to w as a tar: what
// `docker buildx build --output type=tar` writes. Staging happens in the
// store's directory and is removed afterwards. Of an index it exports
// platform's image ("" is the store's platform).
func (s *Store) ExportTar(ctx context.Context, dgst, platform string, w io.Writer) error {
	if err := validDigest(dgst); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("export the filesystem of %s: %w", dgst, err) }
	img, err := resolveImage(ctx, s.src, dgst, cmp.Or(platform, s.opt.Platform))
	if err != nil {
		return fail(err)
	}
	// Below by-digest with a leading dot: Open sweeps it after a crash.
	tmp, err := os.MkdirTemp(filepath.Join(s.dir, "by-digest"), ".export-")
	if err != nil {
		return fail(fmt.Errorf("create staging directory: %w", err))
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		return fail(fmt.Errorf("create staging directory: %w", err))
	}
	if err := applyLayers(ctx, s.src, img, root, func(Progress) {}); err != nil {
		return fail(err)
	}
	if err := writeTree(ctx, root, w); err != nil {
		return fail(err)
	}
	return nil
}

// writeTree writes the tree below root as a tar, parents before children,
// names in lexical order, keeping types, modes, owners, times, hard links,
// devices and xattrs.
func writeTree(ctx context.Context, root string, w io.Writer) error {
	tw := tar.NewWriter(w)
	links := map[uint64]string{} // inode → first path
	buf := make([]byte, 128<<10)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("stat %s: %w", rel, err)
		}
		hdr := &tar.Header{
			Name:    rel,
			Mode:    int64(st.Mode & 07777),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Unix()),
			Format:  tar.FormatPAX,
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		case unix.S_IFREG:
			if st.Nlink > 1 {
				if first, ok := links[st.Ino]; ok {
					hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
					break
				}
				links[st.Ino] = rel
			}
			hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return fmt.Errorf("read link %s: %w", rel, err)
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		case unix.S_IFCHR, unix.S_IFBLK:
			hdr.Typeflag = tar.TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				hdr.Typeflag = tar.TypeBlock
			}
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			hdr.Typeflag = tar.TypeFifo
		default:
			return nil // sockets do not travel in tars
		}
		if err := addXattrs(p, hdr); err != nil {
			return fmt.Errorf("read extended attributes of %s: %w", rel, err)
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if n, err := io.CopyBuffer(tw, f, buf); err != nil {
			return fmt.Errorf("copy %s: %w", rel, err)
		} else if n != hdr.Size {
			return fmt.Errorf("copy %s: %d bytes, want %d", rel, n, hdr.Size)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// addXattrs records p's extended attributes as PAX SCHILY.xattr records.
func addXattrs(p string, hdr *tar.Header) error {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			return nil
		}
		return err
	}
	names := make([]byte, size)
	if size, err = unix.Llistxattr(p, names); err != nil {
		return err
	}
	for _, name := range strings.Split(strings.TrimRight(string(names[:size]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		n, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return err
		}
		val := make([]byte, n)
		if n, err = unix.Lgetxattr(p, name, val); err != nil {
			return err
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords["SCHILY.xattr."+name] = string(val[:n])
	}
	return nil
}

// ExportOCI writes image dgst, for the store's platform, as an OCI image
// layout tar (oci-layout, index.json, blobs/sha256/…) with a Docker
// manifest.json beside it, so `docker load`, podman, skopeo (oci-archive:)
// and containerd all import it. name, if set, is recorded as the image's
// reference name and repo tag. Of an index it exports platform's image
// ("" is the store's platform).
func (s *Store) ExportOCI(ctx context.Context, dgst, name, platform string, w io.Writer) error {
	if err := validDigest(dgst); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("export image %s: %w", dgst, err) }
	img, err := resolveImage(ctx, s.src, dgst, cmp.Or(platform, s.opt.Platform))
	if err != nil {
		return fail(err)
	}
	raw, err := readBlob(ctx, s.src, digest.Digest(img.manifestDigest), maxManifestBytes)
	if err != nil {
		return fail(err)
	}
	var m manifestDoc
	if err := json.Unmarshal(raw, &m); err != nil || m.Config == nil {
		return fail(fmt.Errorf("manifest %s has no config", img.manifestDigest))
	}
	mediaType := m.MediaType
	if mediaType == "" {
		mediaType = v1.MediaTypeImageManifest
	}
	desc := v1.Descriptor{MediaType: mediaType, Digest: digest.Digest(img.manifestDigest), Size: int64(len(raw))}
	var tags []string
	if name != "" {
		desc.Annotations = map[string]string{v1.AnnotationRefName: name}
		tags = []string{name}
	}
	dockerManifest := []map[string]any{{"Config": blobName(m.Config.Digest), "RepoTags": tags, "Layers": func() []string {
		var ls []string
		for _, l := range img.layers {
			ls = append(ls, blobName(l.Digest))
		}
		return ls
	}()}}
	docker, _ := json.Marshal(dockerManifest)
	content := layoutContent{
		manifests: []manifestBlob{{desc.Digest, raw}},
		blobs:     append([]v1.Descriptor{*m.Config}, img.layers...),
	}
	if err := writeLayout(ctx, s.src, w, desc, content, map[string][]byte{"manifest.json": docker}); err != nil {
		return fail(err)
	}
	return nil
}

// copyBlob writes blob b into tw as name, checking size and digest.
func copyBlob(ctx context.Context, src Source, tw *tar.Writer, name string, b v1.Descriptor) error {
	rc, err := src.Blob(ctx, b.Digest.String())
	if err != nil {
		return err
	}
	defer rc.Close()
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: b.Size, Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	v := b.Digest.Verifier()
	n, err := io.Copy(io.MultiWriter(tw, v), io.LimitReader(rc, b.Size+1))
	if err != nil {
		return fmt.Errorf("copy blob %s: %w", b.Digest, err)
	}
	if n != b.Size || !v.Verified() {
		return fmt.Errorf("blob %s in the registry does not match its descriptor (%d bytes, want %d)", b.Digest, n, b.Size)
	}
	return nil
}
