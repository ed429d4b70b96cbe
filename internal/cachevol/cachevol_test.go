package cachevol

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const testSize = 256 << 20

func newManager(t *testing.T, dir string, cfg Config) *Manager {
	t.Helper()
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = testSize
	}
	if cfg.Stamp == "" {
		cfg.Stamp = "buildkit-test-1"
	}
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	m, err := Open(dir, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return m
}

func acquire(t *testing.T, m *Manager, scope string) *Volume {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	v, err := m.Acquire(ctx, scope)
	if err != nil {
		t.Fatalf("Acquire(%q): %v", scope, err)
	}
	t.Cleanup(func() { v.Release() })
	return v
}

func release(t *testing.T, v *Volume) {
	t.Helper()
	if err := v.Release(); err != nil {
		t.Fatalf("Release(%q): %v", v.Scope(), err)
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop mounts")
	}
}

// mount loop-mounts img the way the process runtime does and returns the
// mount point plus a func that unmounts it (also run at test end).
func mount(t *testing.T, img string) (string, func()) {
	t.Helper()
	needRoot(t)
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v: %s", img, err, out)
	}
	mounted := true
	umount := func() {
		if !mounted {
			return
		}
		mounted = false
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	}
	t.Cleanup(umount)
	return mnt, umount
}

func writeRandom(t *testing.T, path string, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// fill writes n random bytes into a file on the volume.
func fill(t *testing.T, v *Volume, name string, n int) {
	t.Helper()
	mnt, umount := mount(t, v.Path())
	writeRandom(t, filepath.Join(mnt, name), n)
	umount()
}

func listByScope(t *testing.T, m *Manager) map[string]Info {
	t.Helper()
	infos, err := m.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	out := map[string]Info{}
	for _, in := range infos {
		out[in.Scope] = in
	}
	return out
}

func TestCreateThenReacquireKeepsData(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v := acquire(t, m, "tenant-a")
	if !v.Created() || v.Wiped() {
		t.Fatalf("first acquire: Created=%v Wiped=%v, want new and not wiped", v.Created(), v.Wiped())
	}
	if v.Size() != testSize {
		t.Fatalf("Size = %d, want %d", v.Size(), testSize)
	}
	fi, err := os.Stat(v.Path())
	if err != nil || fi.Size() != testSize {
		t.Fatalf("image %s: %v, size %d", v.Path(), err, fi.Size())
	}
	if alloc := allocatedBytes(fi); alloc > 16<<20 {
		t.Fatalf("fresh image allocates %d bytes on the host; it should be sparse", alloc)
	}
	mnt, umount := mount(t, v.Path())
	want := writeRandom(t, filepath.Join(mnt, "marker"), 4096)
	umount()
	release(t, v)

	v2 := acquire(t, m, "tenant-a")
	if v2.Created() || v2.Wiped() {
		t.Fatalf("reacquire: Created=%v Wiped=%v, want existing volume", v2.Created(), v2.Wiped())
	}
	if v2.Path() != v.Path() {
		t.Fatalf("reacquire path %s, first %s", v2.Path(), v.Path())
	}
	mnt, umount = mount(t, v2.Path())
	got, err := os.ReadFile(filepath.Join(mnt, "marker"))
	umount()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("marker after reacquire: err=%v, equal=%v", err, bytes.Equal(got, want))
	}
	release(t, v2)
	if err := v2.Release(); err != nil {
		t.Fatalf("second Release: %v", err)
	}
}

func TestScopesAreSeparateFiles(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir, Config{})
	a := acquire(t, m, "tenant-a")
	b := acquire(t, m, "tenant-b") // must not wait for a
	if a.Path() == b.Path() || filepath.Dir(a.Path()) == filepath.Dir(b.Path()) {
		t.Fatalf("scopes share storage: %s and %s", a.Path(), b.Path())
	}
	for _, v := range []*Volume{a, b} {
		if strings.Contains(v.Path(), v.Scope()) {
			t.Fatalf("path %s contains the raw scope", v.Path())
		}
		if !strings.HasPrefix(v.Path(), dir+string(filepath.Separator)) {
			t.Fatalf("path %s escapes data dir %s", v.Path(), dir)
		}
	}
	mnt, umount := mount(t, a.Path())
	writeRandom(t, filepath.Join(mnt, "only-in-a"), 10)
	umount()
	mnt, umount = mount(t, b.Path())
	_, err := os.Stat(filepath.Join(mnt, "only-in-a"))
	umount()
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("file written to scope a visible in scope b (stat err %v)", err)
	}
	release(t, a)
	release(t, b)
	if got := listByScope(t, m); len(got) != 2 {
		t.Fatalf("List has %d volumes, want 2: %v", len(got), got)
	}
}

func TestTryAcquire(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v := acquire(t, m, "tenant-a")
	if _, ok, err := m.TryAcquire(t.Context(), "tenant-a"); ok || err != nil {
		t.Fatalf("TryAcquire while held: ok=%v err=%v, want false, nil", ok, err)
	}
	if got := listByScope(t, m)["tenant-a"]; !got.InUse {
		t.Fatalf("List while held: InUse=false")
	}
	release(t, v)
	v2, ok, err := m.TryAcquire(t.Context(), "tenant-a")
	if !ok || err != nil {
		t.Fatalf("TryAcquire after release: ok=%v err=%v", ok, err)
	}
	if v2.Created() {
		t.Fatalf("TryAcquire recreated an existing volume")
	}
	if got := listByScope(t, m)["tenant-a"]; !got.InUse {
		t.Fatalf("List after TryAcquire: InUse=false")
	}
	release(t, v2)
	if got := listByScope(t, m)["tenant-a"]; got.InUse {
		t.Fatalf("List after release: InUse=true")
	}
}

func TestAcquireWaitsForReleaseAndHonoursCancel(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v := acquire(t, m, "tenant-a")

	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := m.Acquire(ctx, "tenant-a"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire with expiring ctx while held: %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 5*time.Second {
		t.Fatalf("canceled Acquire returned after %v", d)
	}

	got := make(chan *Volume, 1)
	go func() {
		v2, err := m.Acquire(t.Context(), "tenant-a")
		if err != nil {
			t.Errorf("waiting Acquire: %v", err)
		}
		got <- v2
	}()
	select {
	case <-got:
		t.Fatal("Acquire returned while another build held the scope")
	case <-time.After(300 * time.Millisecond):
	}
	release(t, v)
	select {
	case v2 := <-got:
		if v2 == nil {
			return
		}
		if v2.Created() {
			t.Fatal("waiter got a recreated volume")
		}
		release(t, v2)
	case <-time.After(10 * time.Second):
		t.Fatal("Acquire still blocked after release")
	}
}

func TestSecondProcessCannotAttach(t *testing.T) {
	dir := t.TempDir()
	m1 := newManager(t, dir, Config{})
	v := acquire(t, m1, "tenant-a")

	// A second Manager has its own lock file descriptions, exactly like a
	// second kiln process on the same data dir.
	m2 := newManager(t, dir, Config{})
	if _, err := os.Stat(v.Path()); err != nil {
		t.Fatalf("second Open removed a held volume: %v", err)
	}
	if _, ok, err := m2.TryAcquire(t.Context(), "tenant-a"); ok || err != nil {
		t.Fatalf("second manager TryAcquire while held: ok=%v err=%v", ok, err)
	}
	if got := listByScope(t, m2)["tenant-a"]; !got.InUse {
		t.Fatal("second manager List: InUse=false for a volume held by the first")
	}
	if err := m2.Delete(t.Context(), "tenant-a"); !errors.Is(err, ErrInUse) {
		t.Fatalf("second manager Delete while held: %v, want ErrInUse", err)
	}
	done := make(chan error, 1)
	go func() {
		v2, err := m2.Acquire(t.Context(), "tenant-a")
		if err == nil {
			err = v2.Release()
		}
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	release(t, v)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("second manager Acquire after release: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second manager still blocked after release")
	}
}

func TestScratchDeletedOnRelease(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v, err := m.Scratch(t.Context(), 64<<20)
	if err != nil {
		t.Fatalf("Scratch: %v", err)
	}
	if v.Scope() != "" || !v.IsScratch() || !v.Created() || v.Size() != 64<<20 {
		t.Fatalf("scratch volume: scope=%q scratch=%v created=%v size=%d", v.Scope(), v.IsScratch(), v.Created(), v.Size())
	}
	mnt, umount := mount(t, v.Path())
	writeRandom(t, filepath.Join(mnt, "x"), 1<<20)
	umount()
	if got := listByScope(t, m); len(got) != 0 {
		t.Fatalf("List shows scratch volumes: %v", got)
	}
	release(t, v)
	if _, err := os.Stat(filepath.Dir(v.Path())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("scratch volume dir still there after Release: %v", err)
	}
	if err := v.Release(); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	if _, err := m.Scratch(t.Context(), 1<<20); err == nil || !strings.Contains(err.Error(), "minimum") {
		t.Fatalf("tiny scratch: %v, want minimum size error", err)
	}
}

func TestStampChangeWipes(t *testing.T) {
	dir := t.TempDir()
	m1 := newManager(t, dir, Config{Stamp: "v0.33.0"})
	v := acquire(t, m1, "tenant-a")
	fill(t, v, "marker", 1000)
	release(t, v)

	m2 := newManager(t, dir, Config{Stamp: "v0.34.2"})
	v2 := acquire(t, m2, "tenant-a")
	if !v2.Wiped() || !v2.Created() {
		t.Fatalf("acquire after stamp change: Wiped=%v Created=%v", v2.Wiped(), v2.Created())
	}
	if r := v2.WipeReason(); !strings.Contains(r, "v0.33.0") || !strings.Contains(r, "v0.34.2") {
		t.Fatalf("WipeReason %q does not name both versions", r)
	}
	mnt, umount := mount(t, v2.Path())
	_, err := os.Stat(filepath.Join(mnt, "marker"))
	umount()
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("old data survived a stamp change (stat err %v)", err)
	}
	release(t, v2)
	if got := listByScope(t, m2)["tenant-a"]; got.Stamp != "v0.34.2" {
		t.Fatalf("List stamp %q after wipe", got.Stamp)
	}
	v3 := acquire(t, m2, "tenant-a")
	if v3.Wiped() || v3.Created() {
		t.Fatalf("acquire under same stamp wiped again")
	}
}

func TestEvictByCountSkipsInUse(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{MaxCount: 2})
	for _, s := range []string{"a", "b"} {
		release(t, acquire(t, m, s))
	}
	c := acquire(t, m, "c") // 3 > 2: a is least recently used
	got := listByScope(t, m)
	if _, ok := got["a"]; ok || len(got) != 2 {
		t.Fatalf("after creating c with MaxCount 2: %v, want b and c", keys(got))
	}
	release(t, c)

	b := acquire(t, m, "b") // b is now the LRU idle one, but held
	d := acquire(t, m, "d")
	got = listByScope(t, m)
	if _, ok := got["b"]; !ok {
		t.Fatalf("evicted held volume b: %v", keys(got))
	}
	if _, ok := got["c"]; ok {
		t.Fatalf("c (idle) should have been evicted instead of held b: %v", keys(got))
	}
	if _, ok := got["d"]; !ok {
		t.Fatalf("just-created d was evicted: %v", keys(got))
	}
	release(t, b)
	release(t, d)
}

func TestEvictByBytes(t *testing.T) {
	needRoot(t)
	m := newManager(t, t.TempDir(), Config{MaxTotalBytes: 30 << 20})
	a := acquire(t, m, "a")
	fill(t, a, "data", 20<<20)
	release(t, a)

	b := acquire(t, m, "b")
	fill(t, b, "data", 20<<20) // b stays held
	if ev, err := m.Evict(t.Context()); err != nil || len(ev) != 1 || ev[0].Scope != "a" {
		t.Fatalf("Evict over byte limit: %v %v, want a evicted", ev, err)
	}
	got := listByScope(t, m)
	if _, ok := got["b"]; !ok || len(got) != 1 {
		t.Fatalf("after eviction: %v, want only b", keys(got))
	}
	if got["b"].AllocatedBytes < 20<<20 {
		t.Fatalf("b allocates %d bytes after writing 20 MiB", got["b"].AllocatedBytes)
	}

	// Still over nothing; now push over with b held: the only idle volume
	// is c, so c goes and b (LRU but attached) stays.
	c := acquire(t, m, "c")
	fill(t, c, "data", 20<<20)
	release(t, c) // c is the warmest after its release, and kept
	if got := listByScope(t, m); len(got) != 2 {
		t.Fatalf("release of c evicted something while the rest is in use: %v", keys(got))
	}
	if ev, err := m.Evict(t.Context()); err != nil || len(ev) != 1 || ev[0].Scope != "c" {
		t.Fatalf("Evict with b held: %v %v, want c evicted", ev, err)
	}
	if _, ok := listByScope(t, m)["b"]; !ok {
		t.Fatal("held volume b was evicted")
	}
	release(t, b)
}

func TestDeleteRefusesInUse(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v := acquire(t, m, "tenant-a")
	err := m.Delete(t.Context(), "tenant-a")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "cancel") {
		t.Fatalf("Delete while held: %v, want ErrInUse telling to wait or cancel", err)
	}
	if _, err := os.Stat(v.Path()); err != nil {
		t.Fatalf("refused Delete touched the image: %v", err)
	}
	release(t, v)
	if err := m.Delete(t.Context(), "tenant-a"); err != nil {
		t.Fatalf("Delete idle: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(v.Path())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("volume dir survived Delete: %v", err)
	}
	if err := m.Delete(t.Context(), "tenant-a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete: %v, want ErrNotFound", err)
	}
	if err := m.Delete(t.Context(), "never-existed"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Delete unknown scope: %v, want ErrNotFound", err)
	}
	v2 := acquire(t, m, "tenant-a")
	if !v2.Created() {
		t.Fatal("acquire after Delete did not create a new volume")
	}
}

func TestUsedBytesGrowsAfterWrite(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	release(t, acquire(t, m, "tenant-a"))
	before := listByScope(t, m)["tenant-a"]
	if before.UsedBytes <= 0 || before.SizeBytes != testSize {
		t.Fatalf("fresh volume: used %d size %d", before.UsedBytes, before.SizeBytes)
	}

	v := acquire(t, m, "tenant-a")
	fill(t, v, "big", 50<<20)
	release(t, v)
	after := listByScope(t, m)["tenant-a"]
	if after.UsedBytes < before.UsedBytes+50<<20 {
		t.Fatalf("UsedBytes %d after writing 50 MiB, was %d", after.UsedBytes, before.UsedBytes)
	}
	if after.AllocatedBytes < 50<<20 {
		t.Fatalf("AllocatedBytes %d after writing 50 MiB", after.AllocatedBytes)
	}
	if !after.LastUsed.After(before.LastUsed) {
		t.Fatalf("LastUsed did not advance: %v -> %v", before.LastUsed, after.LastUsed)
	}
	if after.InUse {
		t.Fatal("released volume listed as in use")
	}
}

func TestOpenCleansCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir, Config{})
	good := acquire(t, m, "good")
	release(t, good)

	// A create interrupted after mkfs, before the meta.json commit.
	halfID, _ := scopeID("half")
	halfDir := filepath.Join(dir, volumesDir, halfID)
	os.MkdirAll(halfDir, 0o700)
	os.WriteFile(filepath.Join(halfDir, imageName+tmpSuffix), []byte("partial"), 0o600)
	os.WriteFile(filepath.Join(halfDir, imageName), []byte("not committed"), 0o600)
	// A metadata write interrupted before its rename, next to a good volume.
	os.WriteFile(filepath.Join(filepath.Dir(good.Path()), metaName+tmpSuffix), []byte("{"), 0o600)
	// A scratch volume whose build died with the process.
	scratch := filepath.Join(dir, scratchDir, "0123456789abcdef")
	os.MkdirAll(scratch, 0o700)
	os.WriteFile(filepath.Join(scratch, imageName), []byte("x"), 0o600)

	m2 := newManager(t, dir, Config{})
	for _, p := range []string{halfDir, scratch, filepath.Join(filepath.Dir(good.Path()), metaName+tmpSuffix)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Open left %s behind (stat err %v)", p, err)
		}
	}
	got := listByScope(t, m2)
	if _, ok := got["good"]; !ok || len(got) != 1 {
		t.Fatalf("after cleanup List = %v, want only good", keys(got))
	}
	v := acquire(t, m2, "good")
	if v.Created() {
		t.Fatal("cleanup destroyed the committed volume")
	}
	h := acquire(t, m2, "half")
	if !h.Created() {
		t.Fatal("half-created volume was treated as valid")
	}
}

func TestScopeStrings(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir, Config{})

	_, err := m.Acquire(t.Context(), "")
	if !errors.Is(err, ErrInvalidScope) || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty scope: %v", err)
	}
	if _, _, err := m.TryAcquire(t.Context(), ""); !errors.Is(err, ErrInvalidScope) {
		t.Fatalf("TryAcquire empty scope: %v", err)
	}
	if err := m.Delete(t.Context(), ""); !errors.Is(err, ErrInvalidScope) {
		t.Fatalf("Delete empty scope: %v", err)
	}
	for _, bad := range []string{strings.Repeat("x", MaxScopeLen+1), "a\nb", "bad\xffutf8"} {
		if _, err := m.Acquire(t.Context(), bad); !errors.Is(err, ErrInvalidScope) {
			t.Errorf("scope %.20q accepted: %v", bad, err)
		}
	}

	odd := []string{"../x", "../../etc/passwd", "/abs", ".", "x", "x ", strings.Repeat("y", MaxScopeLen), "テナント/🙂", "u-3f2a…"}
	for _, s := range odd {
		v := acquire(t, m, s)
		rel, err := filepath.Rel(filepath.Join(dir, volumesDir), v.Path())
		if err != nil || strings.HasPrefix(rel, "..") || strings.Count(rel, string(filepath.Separator)) != 1 {
			t.Errorf("scope %.20q: path %s not a direct volume dir under %s", s, v.Path(), dir)
		}
		release(t, v)
	}
	if _, err := os.Stat(filepath.Join(dir, "..", "x")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("scope ../x created a file outside the data dir")
	}
	got := listByScope(t, m)
	if len(got) != len(odd) {
		t.Fatalf("List has %d volumes for %d distinct scopes", len(got), len(odd))
	}
	for _, s := range odd {
		if _, ok := got[s]; !ok {
			t.Errorf("scope %.20q not listed under its exact name", s)
		}
	}
}

func TestReleaseWhileStillMountedIsReported(t *testing.T) {
	m := newManager(t, t.TempDir(), Config{})
	v := acquire(t, m, "tenant-a")
	_, umount := mount(t, v.Path())
	if err := v.Release(); err == nil || !strings.Contains(err.Error(), "still attached") {
		t.Fatalf("Release with image mounted: %v, want still-attached error", err)
	}
	if _, err := m.Acquire(t.Context(), "tenant-a"); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "/dev/loop") {
		t.Fatalf("Acquire while a stale mount exists: %v, want ErrInUse naming the loop device", err)
	}
	umount()
	release(t, acquire(t, m, "tenant-a"))
}

func TestOpenRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{{DefaultSize: 1 << 20}, {MaxTotalBytes: -1}, {MaxCount: -1}} {
		if _, err := Open(t.TempDir(), cfg); err == nil {
			t.Errorf("Open accepted %+v", cfg)
		}
	}
}

func keys(m map[string]Info) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestConcurrentAcquireIsExclusive(t *testing.T) {
	dir := t.TempDir()
	managers := []*Manager{newManager(t, dir, Config{}), newManager(t, dir, Config{})}
	var holders, overlaps atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 3 {
				v, err := managers[i%2].Acquire(t.Context(), "shared")
				if err != nil {
					t.Errorf("Acquire: %v", err)
					return
				}
				if n := holders.Add(1); n > 1 {
					overlaps.Add(1)
				}
				time.Sleep(5 * time.Millisecond)
				holders.Add(-1)
				if err := v.Release(); err != nil {
					t.Errorf("Release: %v", err)
				}
			}
		})
	}
	wg.Wait()
	if n := overlaps.Load(); n != 0 {
		t.Fatalf("%d acquires overlapped another holder of the same scope", n)
	}
	if got := listByScope(t, managers[0]); len(got) != 1 || got["shared"].InUse {
		t.Fatalf("after concurrent use: %v", got)
	}
}
