package builderimage

import (
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// rootFile is one regular file, symlink or directory of the root
// filesystem, rooted at "/" ("/usr/bin/buildkitd").
type rootFile struct {
	Path   string
	Mode   fs.FileMode
	Source string // host file whose content is copied (regular files)
	Data   []byte // literal content (regular files without Source)
	Link   string // symlink target
}

// libSearchPath is where shared libraries live on Debian amd64; the
// guest's ld.so searches the same multiarch directories.
var libSearchPath = []string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
	"/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// rootLayout lists the root filesystem: the binaries, the shared libraries
// runc needs, merged-/usr symlinks, the minimal /etc, and empty mount
// points that init and the agent mount over (the erofs root is read-only,
// so every mount point must already exist in it).
func rootLayout(agent, buildkitd, runc string, caBundle string) ([]rootFile, error) {
	files := []rootFile{
		{Path: "/bin", Mode: fs.ModeSymlink, Link: "usr/bin"},
		{Path: "/sbin", Mode: fs.ModeSymlink, Link: "usr/sbin"},
		{Path: "/lib", Mode: fs.ModeSymlink, Link: "usr/lib"},
		{Path: "/lib64", Mode: fs.ModeSymlink, Link: "usr/lib64"},
		{Path: "/var/run", Mode: fs.ModeSymlink, Link: "../run"},
		{Path: "/var/tmp", Mode: fs.ModeSymlink, Link: "../tmp"},
		{Path: "/etc/resolv.conf", Mode: fs.ModeSymlink, Link: "../run/resolv.conf"},
		{Path: "/etc/mtab", Mode: fs.ModeSymlink, Link: "../proc/self/mounts"},
		{Path: "/usr/bin/kiln-agent", Mode: 0o755, Source: agent},
		{Path: "/usr/bin/buildkitd", Mode: 0o755, Source: buildkitd},
		{Path: "/usr/sbin/runc", Mode: 0o755, Source: runc},
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		// The agent writes /run/hosts: the registry's host name, when
		// builds name it by one, must resolve to its tunnel.
		{Path: "/etc/hosts", Mode: fs.ModeSymlink, Link: "../run/hosts"},
		{Path: "/etc/hostname", Mode: 0o644, Data: []byte("kiln-builder\n")},
		{Path: "/etc/nsswitch.conf", Mode: 0o644, Data: []byte("passwd: files\ngroup: files\nhosts: files dns\n")},
		{Path: "/etc/os-release", Mode: 0o644, Data: []byte("NAME=\"kiln builder\"\nID=kiln-builder\n")},
	}
	for _, d := range []string{"/dev", "/proc", "/sys", "/run", "/root", "/var/lib/buildkit"} {
		files = append(files, rootFile{Path: d, Mode: fs.ModeDir | 0o755})
	}
	files = append(files, rootFile{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777})
	if caBundle != "" {
		files = append(files, rootFile{Path: "/etc/ssl/certs/ca-certificates.crt", Mode: 0o644, Source: caBundle})
	}
	libs, err := sharedLibs(runc)
	if err != nil {
		return nil, fmt.Errorf("collect shared libraries of %s: %w", runc, err)
	}
	files = append(files, libs...)
	return files, nil
}

// sharedLibs returns the dynamic loader and the transitive DT_NEEDED
// closure of an ELF binary, placed where the guest's loader looks. Reading
// the ELF instead of running ldd keeps the build free of executing host
// binaries and deterministic.
func sharedLibs(bin string) ([]rootFile, error) {
	var out []rootFile
	seen := map[string]bool{}
	queue := []string{bin}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		interp, needed, err := elfDeps(cur)
		if err != nil {
			return nil, err
		}
		if interp != "" && !seen[interp] {
			seen[interp] = true
			if _, err := os.Stat(interp); err != nil {
				return nil, fmt.Errorf("dynamic loader %s of %s: %w", interp, cur, err)
			}
			out = append(out, rootFile{Path: usrPath(interp), Mode: 0o755, Source: interp})
		}
		for _, lib := range needed {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			p, err := findLib(lib)
			if err != nil {
				return nil, fmt.Errorf("%s needs %s: %w", cur, lib, err)
			}
			out = append(out, rootFile{Path: usrPath(p), Mode: 0o755, Source: p})
			queue = append(queue, p)
		}
	}
	return out, nil
}

func elfDeps(path string) (interp string, needed []string, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", nil, fmt.Errorf("read ELF %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				return "", nil, fmt.Errorf("read interpreter of %s: %w", path, err)
			}
			interp = strings.TrimRight(string(b), "\x00")
		}
	}
	needed, err = f.ImportedLibraries()
	if err != nil {
		return "", nil, fmt.Errorf("read DT_NEEDED of %s: %w", path, err)
	}
	return interp, needed, nil
}

func findLib(name string) (string, error) {
	for _, dir := range libSearchPath {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("not found in %s; install the package that provides it", strings.Join(libSearchPath, ", "))
}

// usrPath maps a host path to its place in the merged-/usr guest root.
func usrPath(p string) string {
	for _, top := range []string{"/lib64/", "/lib/", "/bin/", "/sbin/"} {
		if strings.HasPrefix(p, top) {
			return "/usr" + p
		}
	}
	return p
}

// isStatic reports whether an ELF binary runs without a dynamic loader,
// as everything Go that goes into the guest must.
func isStatic(path string) error {
	interp, needed, err := elfDeps(path)
	if err != nil {
		return err
	}
	if interp != "" || len(needed) > 0 {
		return fmt.Errorf("%s is dynamically linked (interpreter %q, needs %v); build it with CGO_ENABLED=0", path, interp, needed)
	}
	return nil
}

// stageRoot writes the files into dir (which must be empty) with their
// modes; parent directories are created 0755.
func stageRoot(dir string, files []rootFile) error {
	sorted := append([]rootFile(nil), files...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Path < sorted[j].Path })
	for _, f := range sorted {
		dst := filepath.Join(dir, f.Path)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		switch {
		case f.Mode&fs.ModeSymlink != 0:
			if err := os.Symlink(f.Link, dst); err != nil {
				return err
			}
		case f.Mode.IsDir():
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
			// Chmod after Mkdir: the umask must not decide the mode.
			if err := os.Chmod(dst, f.Mode); err != nil {
				return err
			}
		default:
			if err := writeFile(dst, f); err != nil {
				return fmt.Errorf("stage %s: %w", f.Path, err)
			}
		}
	}
	return nil
}

func writeFile(dst string, f rootFile) error {
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if f.Source != "" {
		in, err := os.Open(f.Source)
		if err != nil {
			out.Close()
			return err
		}
		_, err = io.Copy(out, in)
		in.Close()
		if err != nil {
			out.Close()
			return err
		}
	} else if _, err := out.Write(f.Data); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, f.Mode.Perm())
}

// treeDigest hashes a staged tree: path, type, mode, link target and
// content of every entry in sorted order. It is what the up-to-date check
// compares, so anything that changes the erofs image changes it.
func treeDigest(dir string) (string, error) {
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\x00%o\x00", filepath.ToSlash(rel), fi.Mode())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "%s\x00", t)
		case fi.Mode().IsRegular():
			sum, err := fileSHA256(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "%s\x00", sum)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash staged root: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// mkErofs writes the staged tree as an erofs image. A fixed timestamp,
// root ownership, no xattrs (host SELinux labels would leak in) and a
// UUID derived from the content make the bytes a function of the tree.
func mkErofs(ctx context.Context, mkfs, src, dst, uuid string) error {
	cmd := exec.CommandContext(ctx, mkfs, "--quiet", "-T0", "--all-root", "-x-1", "-U"+uuid, dst, src)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%s: %w: %s", cmd, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// uuidFrom formats the first 16 bytes of a hex digest as a UUID.
func uuidFrom(hexDigest string) (string, error) {
	if len(hexDigest) < 32 {
		return "", errors.New("digest too short for a UUID")
	}
	h := hexDigest
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32], nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
