package rootfs

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/testkit"
)

// capNetRaw is a security.capability value (VFS_CAP_REVISION_2, effective)
// granting cap_net_raw, as setcap cap_net_raw+ep writes it.
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// specImage pushes a three-layer image (gzip, zstd, uncompressed) that
// exercises every rule of the OCI layer format. hostDir and hostFile are
// real paths outside the image that symlinks in the image point at.
func specImage(t *testing.T, r *testRegistry, repo, hostFile string) string {
	t.Helper()
	fine := time.Date(2001, 2, 3, 4, 5, 6, 123456789, time.UTC)
	base := makeLayer(t, "gzip", tarOf(t,
		dirE("etc/", 0o755),
		fileE("etc/hostname", "base\n", 0o644).mtime(fine).xattr("user.kiln", "hello"),
		fileE("etc/removeme", "x", 0o644),
		dirE("gone/", 0o755),
		fileE("gone/a", "a", 0o644),
		dirE("gone/b/", 0o755),
		fileE("gone/b/c", "c", 0o644),
		dirE("opq/", 0o755),
		fileE("opq/old1", "old", 0o644),
		dirE("opq/olddir/", 0o755),
		fileE("opq/olddir/x", "x", 0o644),
		dirE("opq2/", 0o755),
		fileE("opq2/old", "old", 0o644),
		dirE("usr/", 0o755),
		dirE("usr/lib/", 0o755),
		fileE("usr/lib/libfoo.so", "libfoo", 0o644),
		symlinkE("lib", "usr/lib"),
		symlinkE("etc/abs", "/etc/hostname"),
		symlinkE("dangling", "/no/such/file"),
		symlinkE("up", "../../../../.."),
		symlinkE("victim", hostFile),
		dirE("bin/", 0o755),
		fileE("bin/tool", "tool v1", 0o4755),
		fileE("bin/ping", "ping", 0o755).xattr("security.capability", capNetRaw),
		fileE("bin/grp", "grp", 0o2755).owner(0, 50),
		dirE("tmp/", 0o1777),
		dirE("home/", 0o755),
		dirE("home/user/", 0o750).owner(1000, 1000),
		fileE("home/user/notes", "mine", 0o640).owner(1000, 1001),
		dirE("dev/", 0o755),
		nodeE("dev/null", tar.TypeChar, 1, 3, 0o666),
		nodeE("dev/loop0", tar.TypeBlock, 7, 0, 0o660).owner(0, 6),
		nodeE("run.fifo", tar.TypeFifo, 0, 0, 0o600),
	))
	upper := makeLayer(t, "zstd", tarOf(t,
		dirE("etc/", 0o755),
		fileE("etc/.wh.removeme", "", 0),
		fileE(".wh.gone", "", 0),
		dirE("opq/", 0o755),
		fileE("opq/.wh..wh..opq", "", 0),
		fileE("opq/new", "new", 0o644),
		// A marker after this layer's own entries hides only lower ones.
		dirE("opq2/", 0o755),
		fileE("opq2/early", "early", 0o644),
		fileE("opq2/.wh..wh..opq", "", 0),
		hardlinkE("usr/lib/libfoo.so.1", "usr/lib/libfoo.so"),
		// Parent "lib" is a symlink from the layer below: it resolves
		// inside the image, to usr/lib.
		fileE("lib/viasymlink", "v", 0o644),
		// "up" points far above the root; it must land inside the image.
		dirE("up/etc/", 0o755),
		fileE("up/etc/contained", "c", 0o644),
		// Replaces the symlink to a host file; the host file is untouched.
		fileE("victim", "image content", 0o644),
		// Same-layer whiteouts do not hide what this layer adds.
		fileE("etc/keep", "keep", 0o644),
		fileE("etc/.wh.keep", "", 0),
	))
	top := makeLayer(t, "", tarOf(t,
		dirE("bin/", 0o755),
		fileE("bin/tool", "tool v2", 0o4755),
		dirE("gone/", 0o700),
		fileE("gone/fresh", "fresh", 0o644),
		// Hard link to a file from the first layer, named through a
		// symlink ("up" -> far above the root) that resolves inside it.
		hardlinkE("etc/hostname.link", "up/etc/hostname"),
	))
	cfg := v1.ImageConfig{
		Entrypoint: []string{"/bin/tool"},
		Cmd:        []string{"--serve"},
		Env:        []string{"PATH=/usr/bin:/bin", "MODE=test"},
		WorkingDir: "/home/user",
		User:       "1000:1000",
	}
	return r.pushImage(t, repo, "v1", "amd64", cfg, base, upper, top)
}

func TestConvertAppliesLayersAsTheOCISpecSays(t *testing.T) {
	for _, format := range []Format{FormatErofs, FormatExt4} {
		t.Run(string(format), func(t *testing.T) {
			requireTool(t, format)
			r := startRegistry(t)
			hostFile := filepath.Join(t.TempDir(), "host-secret")
			if err := os.WriteFile(hostFile, []byte("host"), 0o600); err != nil {
				t.Fatal(err)
			}
			dgst := specImage(t, r, "spec/"+string(format), hostFile)

			dst := filepath.Join(t.TempDir(), "out")
			res, err := Convert(context.Background(), r.Registry, dgst, dst, Options{Format: format})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("converted in %v (mkfs %v), %s image %d bytes", res.Duration, res.Mkfs, format, res.Size)
			if got := listDir(t, dst); !reflect.DeepEqual(got, []string{"config.json", "rootfs." + string(format)}) {
				t.Errorf("artifact directory holds %v, want config.json and the image only", got)
			}
			if b, _ := os.ReadFile(hostFile); string(b) != "host" {
				t.Errorf("host file behind an image symlink now holds %q", b)
			}
			if _, err := os.Lstat("/etc/contained"); err == nil {
				os.Remove("/etc/contained")
				t.Fatal("a layer wrote /etc/contained on the host through a ../ symlink")
			}

			art, err := readArtifact(dst)
			if err != nil {
				t.Fatal(err)
			}
			want := ImageConfig{Entrypoint: []string{"/bin/tool"}, Cmd: []string{"--serve"}, Env: []string{"PATH=/usr/bin:/bin", "MODE=test"}, WorkingDir: "/home/user", User: "1000:1000"}
			if !reflect.DeepEqual(art.Config, want) {
				t.Errorf("config.json config = %+v, want %+v", art.Config, want)
			}
			if art.Digest != dgst || art.ManifestDigest != dgst || art.Layers != 3 || art.Platform != "linux/amd64" || art.Size != res.Size {
				t.Errorf("config.json = %+v", art)
			}

			checkSpecTree(t, mount(t, res.RootFS(), string(format)), format)
		})
	}
}

func checkSpecTree(t *testing.T, root string, format Format) {
	t.Helper()
	p := func(rel string) string { return filepath.Join(root, rel) }
	lstat := func(rel string) *syscall.Stat_t {
		t.Helper()
		fi, err := os.Lstat(p(rel))
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			return &syscall.Stat_t{}
		}
		return fi.Sys().(*syscall.Stat_t)
	}
	absent := func(rel string) {
		t.Helper()
		if _, err := os.Lstat(p(rel)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s should not exist (err %v)", rel, err)
		}
	}
	content := func(rel, want string) {
		t.Helper()
		b, err := os.ReadFile(p(rel))
		if err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", rel, b, err, want)
		}
	}
	link := func(rel, want string) {
		t.Helper()
		got, err := os.Readlink(p(rel))
		if err != nil || got != want {
			t.Errorf("symlink %s -> %q, %v; want -> %q", rel, got, err, want)
		}
	}
	mode := func(rel string, typ, perm uint32) {
		t.Helper()
		st := lstat(rel)
		if st.Mode&unix.S_IFMT != typ || st.Mode&0o7777 != perm {
			t.Errorf("%s mode %o, want type %o perm %o", rel, st.Mode, typ, perm)
		}
	}
	owner := func(rel string, uid, gid uint32) {
		t.Helper()
		if st := lstat(rel); st.Uid != uid || st.Gid != gid {
			t.Errorf("%s owned by %d:%d, want %d:%d", rel, st.Uid, st.Gid, uid, gid)
		}
	}
	xattr := func(rel, name, want string) {
		t.Helper()
		buf := make([]byte, 256)
		n, err := unix.Lgetxattr(p(rel), name, buf)
		if err != nil || string(buf[:n]) != want {
			t.Errorf("%s xattr %s = %q, %v; want %q", rel, name, buf[:max(n, 0)], err, want)
		}
	}

	// Whiteouts: a file, and a whole directory tree, from lower layers.
	absent("etc/removeme")
	absent("gone/a")
	absent("gone/b")
	content("gone/fresh", "fresh")
	mode("gone", unix.S_IFDIR, 0o700)
	// Opaque directory: lower content hidden, this layer's kept.
	absent("opq/old1")
	absent("opq/olddir")
	content("opq/new", "new")
	if got := listDir(t, p("opq")); !reflect.DeepEqual(got, []string{"new"}) {
		t.Errorf("opq holds %v, want only new", got)
	}
	if got := listDir(t, p("opq2")); !reflect.DeepEqual(got, []string{"early"}) {
		t.Errorf("opq2 holds %v, want only early", got)
	}
	// Same-layer whiteout does not hide its own layer's file.
	content("etc/keep", "keep")
	// No whiteout marker ever materializes.
	absent("etc/.wh.removeme")
	absent("opq/.wh..wh..opq")

	// Hard links, to files from earlier layers.
	lib, libLink := lstat("usr/lib/libfoo.so"), lstat("usr/lib/libfoo.so.1")
	if lib.Ino != libLink.Ino || lib.Nlink != 2 {
		t.Errorf("libfoo.so.1 is not a hard link of libfoo.so (inodes %d/%d, nlink %d)", lib.Ino, libLink.Ino, lib.Nlink)
	}
	host, hostLink := lstat("etc/hostname"), lstat("etc/hostname.link")
	if host.Ino != hostLink.Ino {
		t.Errorf("etc/hostname.link is not a hard link of etc/hostname")
	}
	content("etc/hostname.link", "base\n")

	// Symlinks: relative, absolute, dangling, kept verbatim.
	link("lib", "usr/lib")
	link("etc/abs", "/etc/hostname")
	link("dangling", "/no/such/file")
	link("up", "../../../../..")
	mode("lib", unix.S_IFLNK, 0o777)
	// Writes through a symlinked parent land inside the image.
	content("usr/lib/viasymlink", "v")
	content("etc/contained", "c")
	mode("victim", unix.S_IFREG, 0o644)
	content("victim", "image content")

	// Device nodes and fifo.
	mode("dev/null", unix.S_IFCHR, 0o666)
	if st := lstat("dev/null"); unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
		t.Errorf("dev/null is %d:%d, want 1:3", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	mode("dev/loop0", unix.S_IFBLK, 0o660)
	if st := lstat("dev/loop0"); unix.Major(st.Rdev) != 7 || unix.Minor(st.Rdev) != 0 {
		t.Errorf("dev/loop0 is %d:%d, want 7:0", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	owner("dev/loop0", 0, 6)
	mode("run.fifo", unix.S_IFIFO, 0o600)

	// Modes: setuid survives a later layer replacing the file, setgid
	// survives the chown, sticky directory.
	mode("bin/tool", unix.S_IFREG, 0o4755)
	content("bin/tool", "tool v2")
	mode("bin/grp", unix.S_IFREG, 0o2755)
	owner("bin/grp", 0, 50)
	mode("tmp", unix.S_IFDIR, 0o1777)

	// Ownership.
	owner("home/user", 1000, 1000)
	mode("home/user", unix.S_IFDIR, 0o750)
	owner("home/user/notes", 1000, 1001)
	mode("home/user/notes", unix.S_IFREG, 0o640)

	// Xattrs, including a file capability that chown would have cleared.
	xattr("etc/hostname", "user.kiln", "hello")
	xattr("bin/ping", "security.capability", capNetRaw)

	// Mtimes, to the nanosecond (erofs) or second (mkfs.ext4 -d drops
	// the fraction).
	want := time.Date(2001, 2, 3, 4, 5, 6, 123456789, time.UTC)
	if format == FormatExt4 {
		want = want.Truncate(time.Second)
	}
	fi, err := os.Lstat(p("etc/hostname"))
	if err == nil && !fi.ModTime().Equal(want) {
		t.Errorf("etc/hostname mtime %v, want %v", fi.ModTime().UTC(), want)
	}
	if fi, err := os.Lstat(p("etc")); err == nil && !fi.ModTime().Equal(testTime) {
		t.Errorf("etc mtime %v, want %v from its tar header", fi.ModTime().UTC(), testTime)
	}
	// The root directory has a fixed mode.
	mode(".", unix.S_IFDIR, 0o755)
}

func TestSymlinkEscapeIsRefusedAndLeavesNothing(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	hostDir := t.TempDir()
	cases := map[string][]testLayer{
		// A directory symlink to an absolute host path: inside the image
		// that path does not exist, so the write has nowhere to go.
		"absolute dir symlink": {
			makeLayer(t, "gzip", tarOf(t, symlinkE("esc", hostDir))),
			makeLayer(t, "gzip", tarOf(t, fileE("esc/pwned", "pwned", 0o644))),
		},
		// A hard link through a symlink to / must not reach the host's
		// /etc/passwd.
		"hard link through symlink": {
			makeLayer(t, "gzip", tarOf(t, symlinkE("rootlink", "/"))),
			makeLayer(t, "gzip", tarOf(t, hardlinkE("stolen", "rootlink/etc/passwd"))),
		},
	}
	for name, layers := range cases {
		t.Run(name, func(t *testing.T) {
			dgst := r.pushImage(t, "escape/"+strings.ReplaceAll(name, " ", "-"), "v1", "amd64", v1.ImageConfig{}, layers...)
			parent := t.TempDir()
			_, err := Convert(context.Background(), r.Registry, dgst, filepath.Join(parent, "out"), Options{})
			if err == nil {
				t.Fatal("conversion succeeded; want it refused")
			}
			t.Logf("refused: %v", err)
			if got := listDir(t, hostDir); len(got) != 0 {
				t.Errorf("the layer wrote %v into the host directory", got)
			}
			if got := listDir(t, parent); len(got) != 0 {
				t.Errorf("a failed conversion left %v behind", got)
			}
		})
	}
}

func TestConvertPicksPlatformFromIndex(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	repo := "multi/app"
	amd := r.pushImage(t, repo, "amd", "amd64", v1.ImageConfig{Cmd: []string{"amd64"}},
		makeLayer(t, "gzip", tarOf(t, fileE("arch", "amd64", 0o644))))
	arm := r.pushImage(t, repo, "arm", "arm64", v1.ImageConfig{Cmd: []string{"arm64"}},
		makeLayer(t, "gzip", tarOf(t, fileE("arch", "arm64", 0o644))))
	index := r.pushIndex(t, repo, "multi", [2]string{arm, "arm64"}, [2]string{amd, "amd64"})

	res, err := Convert(context.Background(), r.Registry, index, filepath.Join(t.TempDir(), "out"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != index || res.ManifestDigest != amd || !reflect.DeepEqual(res.Config.Cmd, []string{"amd64"}) {
		t.Errorf("converted %+v, want the amd64 image %s of index %s", res.Artifact, amd, index)
	}
	if b, _ := os.ReadFile(filepath.Join(mount(t, res.RootFS(), "erofs"), "arch")); string(b) != "amd64" {
		t.Errorf("rootfs /arch = %q, want amd64", b)
	}

	// An arm64-only image is refused with the platforms it has.
	_, err = Convert(context.Background(), r.Registry, arm, filepath.Join(t.TempDir(), "out"), Options{})
	if err == nil || !strings.Contains(err.Error(), "arm64") {
		t.Errorf("converting an arm64 image: %v, want a platform error naming arm64", err)
	}
}

func TestConvertIsReproducible(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	hostFile := filepath.Join(t.TempDir(), "f")
	dgst := specImage(t, r, "repro/app", hostFile)
	var sums []string
	for range 2 {
		res, err := Convert(context.Background(), r.Registry, dgst, filepath.Join(t.TempDir(), "out"), Options{})
		if err != nil {
			t.Fatal(err)
		}
		sums = append(sums, testkit.FileDigest(t, res.RootFS()))
		time.Sleep(1100 * time.Millisecond) // a clock-dependent build would differ now
	}
	if sums[0] != sums[1] {
		t.Errorf("two conversions of %s differ: %s vs %s", dgst, sums[0], sums[1])
	}
}

func TestConvertDockerSchema2Images(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	repo := "docker/app"
	layer := makeLayer(t, "gzip", tarOf(t, fileE("hello", "docker", 0o644)))
	img := v1.Image{Platform: v1.Platform{OS: "linux", Architecture: "amd64"}, Config: v1.ImageConfig{Entrypoint: []string{"/hello"}},
		RootFS: v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer.diffID}}}
	m := map[string]any{
		"schemaVersion": 2,
		"mediaType":     dockerManifest,
		"config":        r.PushBlob(t, repo, dockerConfig, mustJSON(t, img)),
		"layers":        []v1.Descriptor{r.PushBlob(t, repo, "application/vnd.docker.image.rootfs.diff.tar.gzip", layer.blob)},
	}
	body := mustJSON(t, m)
	man := r.PushManifest(t, repo, "single", dockerManifest, body)
	list := map[string]any{
		"schemaVersion": 2,
		"mediaType":     dockerManifestList,
		"manifests": []v1.Descriptor{{MediaType: dockerManifest, Digest: digestOf(man), Size: int64(len(body)),
			Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	}
	listDigest := r.PushManifest(t, repo, "list", dockerManifestList, mustJSON(t, list))

	res, err := Convert(context.Background(), r.Registry, listDigest, filepath.Join(t.TempDir(), "out"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.ManifestDigest != man || !reflect.DeepEqual(res.Config.Entrypoint, []string{"/hello"}) {
		t.Errorf("converted %+v, want manifest %s with entrypoint /hello", res.Artifact, man)
	}
	if b, _ := os.ReadFile(filepath.Join(mount(t, res.RootFS(), "erofs"), "hello")); string(b) != "docker" {
		t.Errorf("/hello = %q, want docker", b)
	}
}

func TestConvertRejectsCorruptLayer(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	layer := makeLayer(t, "", tarOf(t, fileE("data", strings.Repeat("d", 10000), 0o644)))
	dgst := r.pushImage(t, "corrupt/app", "v1", "amd64", v1.ImageConfig{}, layer)
	// Flip one byte of the stored layer blob, in the registry's own storage.
	sum := digest.FromBytes(layer.blob).Encoded()
	blob := filepath.Join(r.Root, "docker/registry/v2/blobs/sha256", sum[:2], sum, "data")
	b, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(blob, b, 0o644); err != nil {
		t.Fatal(err)
	}
	parent := t.TempDir()
	_, err = Convert(context.Background(), r.Registry, dgst, filepath.Join(parent, "out"), Options{})
	if err == nil || !strings.Contains(err.Error(), "does not match its digest") {
		t.Fatalf("converting a corrupt layer: %v, want a digest mismatch", err)
	}
	if got := listDir(t, parent); len(got) != 0 {
		t.Errorf("a failed conversion left %v behind", got)
	}
}
