package cli

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/kiln-build/kiln/api"
)

// output is one --output destination, as docker buildx spells them.
type output struct {
	typ    string // local, tar, oci (docker is oci: docker load reads both)
	dest   string // directory, file, or "-" for stdout
	docker bool   // asked for as type=docker, which holds one image
}

// parseOutput reads one --output value: "type=local,dest=DIR",
// "type=tar,dest=FILE|-", "type=oci|docker,dest=FILE",
// "type=image|registry[,name=NAME...]" (names become tags), or a bare DIR
// (local) or "-" (a tar on stdout). It returns extra tags for image
// outputs.
func parseOutput(v string) (o *output, names []string, push bool, err error) {
	if v == "-" {
		return &output{typ: "tar", dest: "-"}, nil, false, nil
	}
	if !strings.Contains(v, "=") {
		return &output{typ: "local", dest: v}, nil, false, nil
	}
	o = &output{}
	for _, kv := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, nil, false, fmt.Errorf("--output %q: %q is not key=value", v, kv)
		}
		switch k {
		case "type":
			o.typ = val
		case "dest":
			o.dest = val
		case "name":
			names = append(names, val)
		case "push":
			// kiln always pushes into its own registry; push=true also
			// pushes names on other registries there.
			if push, err = strconv.ParseBool(val); err != nil {
				return nil, nil, false, fmt.Errorf("--output %q: push=%q is not true or false", v, val)
			}
		default:
			return nil, nil, false, fmt.Errorf("--output %q: unknown key %q (kiln takes type, dest, name, push)", v, k)
		}
	}
	switch o.typ {
	case "image", "registry":
		if o.dest != "" {
			return nil, nil, false, fmt.Errorf("--output %q: an image output goes to kiln's registry and takes name=, not dest=", v)
		}
		// type=registry is type=image,push=true, as in buildx.
		return nil, names, push || o.typ == "registry", nil
	case "local", "tar", "oci", "docker":
	case "":
		return nil, nil, false, fmt.Errorf("--output %q: say which type= (local, tar, oci, docker, image)", v)
	default:
		return nil, nil, false, fmt.Errorf("--output %q: type %q is unknown: use local, tar, oci, docker or image", v, o.typ)
	}
	if len(names) > 0 {
		return nil, nil, false, fmt.Errorf("--output %q: name= is for type=image", v)
	}
	if o.dest == "" {
		return nil, nil, false, fmt.Errorf("--output %q: needs dest= (a directory for local, a file or - for the others)", v)
	}
	if o.typ == "local" && o.dest == "-" {
		return nil, nil, false, fmt.Errorf("--output %q: a local output needs a directory; use type=tar,dest=- for stdout", v)
	}
	if o.typ == "docker" {
		o.typ, o.docker = "oci", true
	}
	return o, names, false, nil
}

// fetchOutput downloads build b's output and writes it where o says. A
// multi-platform build's filesystem output is one per platform, as buildx
// writes it: a local dest gets a directory per platform (linux_arm64/),
// a tar has every platform's entries under such a directory.
func fetchOutput(ctx context.Context, c *client, b api.Build, o *output, stdout io.Writer) (string, error) {
	plats := []string{""} // the server's platform, the only one, or the whole index
	if b.Platforms != nil && len(*b.Platforms) > 1 && o.typ != "oci" {
		plats = *b.Platforms
	}
	get := func(platform string) (io.ReadCloser, error) {
		typ := api.BuildOutputParamsType("tar")
		if o.typ == "oci" {
			typ = "oci"
		}
		params := &api.BuildOutputParams{Type: &typ}
		if platform != "" {
			params.Platform = &platform
		}
		resp, err := c.api.BuildOutput(ctx, b.Id, params)
		if err != nil {
			return nil, c.transportError(ctx, "download the output of build "+b.Id, err)
		}
		if resp.StatusCode != 200 {
			defer resp.Body.Close()
			return nil, c.readError(resp)
		}
		return resp.Body, nil
	}
	if o.typ == "local" {
		n := 0
		for _, p := range plats {
			body, err := get(p)
			if err != nil {
				return "", err
			}
			dest := o.dest
			if p != "" {
				dest = path.Join(o.dest, platformDir(p))
			}
			k, err := extractTar(body, dest)
			body.Close()
			if err != nil {
				return "", fmt.Errorf("write the output of build %s into %s: %w", b.Id, dest, err)
			}
			n += k
		}
		return fmt.Sprintf("%d entries into %s", n, o.dest), nil
	}
	w := stdout
	if o.dest != "-" {
		f, err := os.Create(o.dest)
		if err != nil {
			return "", fmt.Errorf("write the output of build %s: %w", b.Id, err)
		}
		defer f.Close()
		w = f
	}
	fail := func(err error) (string, error) {
		if o.dest != "-" {
			os.Remove(o.dest)
		}
		return "", fmt.Errorf("download the output of build %s: %w", b.Id, err)
	}
	// Copied through a tar reader, so a stream the server broke off
	// midway (no end marker) is an error here, not a short file that
	// looks fine.
	tw := tar.NewWriter(w)
	n := 0
	for _, p := range plats {
		body, err := get(p)
		if err != nil {
			return fail(err)
		}
		prefix := ""
		if p != "" {
			prefix = platformDir(p) + "/"
			if err := tw.WriteHeader(&tar.Header{Name: prefix, Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
				body.Close()
				return fail(err)
			}
		}
		k, err := copyTar(body, tw, prefix)
		body.Close()
		if err != nil {
			return fail(err)
		}
		n += k
	}
	if err := tw.Close(); err != nil {
		return fail(err)
	}
	if o.dest != "-" {
		if err := w.(*os.File).Close(); err != nil {
			return "", fmt.Errorf("write the output of build %s: %w", b.Id, err)
		}
	}
	return fmt.Sprintf("%s tar of %d entries to %s", o.typ, n, o.dest), nil
}

// platformDir is the directory buildx writes a platform's files into:
// linux/arm/v7 is linux_arm_v7.
func platformDir(p string) string { return strings.ReplaceAll(p, "/", "_") }

// copyTar re-writes a tar stream entry by entry into tw, each name (and
// hard link target) under prefix, and fails if the stream ends early.
func copyTar(r io.Reader, tw *tar.Writer, prefix string) (int, error) {
	tr := tar.NewReader(r)
	n := 0
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		hdr.Name = prefix + hdr.Name
		if hdr.Typeflag == tar.TypeLink {
			hdr.Linkname = prefix + hdr.Linkname
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return n, err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return n, err
		}
		n++
	}
}

// extractTar unpacks a filesystem tar into dir, never outside it (every
// path goes through an os.Root). Device nodes need root; without it they
// are skipped, as docker buildx's local exporter does for a user.
func extractTar(r io.Reader, dir string) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, err
	}
	defer root.Close()
	tr := tar.NewReader(r)
	n := 0
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		name := path.Clean(strings.TrimPrefix(hdr.Name, "/"))
		if name == "." {
			continue
		}
		if !fs.ValidPath(name) {
			return n, fmt.Errorf("entry %q leaves the output directory", hdr.Name)
		}
		if dirName := path.Dir(name); dirName != "." {
			if err := root.MkdirAll(dirName, 0o755); err != nil {
				return n, err
			}
		}
		mode := fs.FileMode(hdr.Mode) & fs.ModePerm
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				return n, err
			}
			if err := root.Chmod(name, mode|0o700); err != nil {
				return n, err
			}
		case tar.TypeReg:
			_ = root.Remove(name)
			f, err := root.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_EXCL, mode|0o600)
			if err != nil {
				return n, err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return n, err
			}
			if err := root.Chmod(name, mode); err != nil {
				return n, err
			}
		case tar.TypeSymlink:
			_ = root.Remove(name)
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return n, err
			}
		case tar.TypeLink:
			_ = root.Remove(name)
			if err := root.Link(path.Clean(strings.TrimPrefix(hdr.Linkname, "/")), name); err != nil {
				return n, err
			}
		default:
			continue // devices and fifos
		}
		if os.Geteuid() == 0 {
			_ = root.Lchown(name, hdr.Uid, hdr.Gid)
		}
		n++
	}
}
