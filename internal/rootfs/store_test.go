package rootfs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// bulkImage pushes an image of layers random files totalling about mb MiB
// per layer, half random and half compressible text, like real software.
func bulkImage(t *testing.T, r *testRegistry, repo string, layers, mb int, compression string) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(layers), uint64(mb)))
	words := strings.Fields("the quick brown fox jumps over lazy dogs while kiln builds images from layers of files")
	var ls []testLayer
	for l := range layers {
		var entries []entry
		entries = append(entries, dirE(fmt.Sprintf("layer%d/", l), 0o755))
		total := 0
		for i := 0; total < mb<<20; i++ {
			size := 4096 + rng.IntN(64<<10)
			buf := make([]byte, size)
			if i%2 == 0 {
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
			} else {
				var sb strings.Builder
				for sb.Len() < size {
					sb.WriteString(words[rng.IntN(len(words))])
					sb.WriteByte(' ')
				}
				copy(buf, sb.String())
			}
			entries = append(entries, fileE(fmt.Sprintf("layer%d/f%05d", l, i), string(buf), 0o644))
			total += size
		}
		ls = append(ls, makeLayer(t, compression, tarOf(t, entries...)))
	}
	return r.pushImage(t, repo, "v1", "amd64", v1.ImageConfig{Cmd: []string{"/bin/sh"}}, ls...)
}

func smallImage(t *testing.T, r *testRegistry, repo string) string {
	return r.pushImage(t, repo, "v1", "amd64", v1.ImageConfig{Cmd: []string{"/app"}},
		makeLayer(t, "gzip", tarOf(t, fileE("app", strings.Repeat("app ", 300000), 0o755))),
		makeLayer(t, "zstd", tarOf(t, fileE("etc/conf", "x=1", 0o644))),
	)
}

func (s *Store) waitersFor(dgst string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.inflight[dgst]; ok {
		return c.waiters
	}
	return 0
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestStoreConvertsEachDigestOnce(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := smallImage(t, r, "once/app")

	var mu sync.Mutex
	var events []Progress
	started, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	opt := Options{Progress: func(p Progress) {
		mu.Lock()
		events = append(events, p)
		mu.Unlock()
		// Hold the first conversion until the second caller has joined it.
		once.Do(func() { close(started); <-gate })
	}}
	dir := t.TempDir()
	s, err := Open(dir, r.Registry, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st, _ := s.Status(dgst); st != StatePending {
		t.Errorf("status before Ensure = %s, want pending", st)
	}

	type result struct {
		art Artifact
		err error
	}
	results := make(chan result, 2)
	ensure := func() {
		art, err := s.Ensure(context.Background(), dgst)
		results <- result{art, err}
	}
	go ensure()
	<-started
	if st, _ := s.Status(dgst); st != StateConverting {
		t.Errorf("status during conversion = %s, want converting", st)
	}
	go ensure()
	waitFor(t, "the second Ensure to join", func() bool { return s.waitersFor(dgst) == 2 })
	close(gate)
	a, b := <-results, <-results
	if a.err != nil || b.err != nil {
		t.Fatalf("Ensure: %v / %v", a.err, b.err)
	}
	if n := s.Conversions(); n != 1 {
		t.Errorf("two concurrent Ensure calls ran %d conversions, want exactly 1", n)
	}
	if a.art.RootFS() != b.art.RootFS() || a.art.RootFS() != filepath.Join(dir, "by-digest", dgst, "rootfs.erofs") {
		t.Errorf("artifacts at %s and %s, want both at by-digest/%s/rootfs.erofs", a.art.RootFS(), b.art.RootFS(), dgst)
	}
	if st, msg := s.Status(dgst); st != StateReady {
		t.Errorf("status after conversion = %s (%s), want ready", st, msg)
	}

	// Progress: bytes climb to the total, then mkfs, then done.
	mu.Lock()
	last := events[len(events)-1]
	var applied int64
	var sawMkfs bool
	for _, p := range events {
		if p.Digest != dgst || p.Applied < applied || p.Applied > p.Total {
			t.Errorf("bad progress event %+v after %d bytes", p, applied)
		}
		applied = p.Applied
		sawMkfs = sawMkfs || p.Phase == PhaseMkfs
	}
	mu.Unlock()
	if last.Phase != PhaseDone || last.Applied != last.Total || last.Total != a.art.LayerBytes || !sawMkfs {
		t.Errorf("last progress %+v (mkfs seen %v), want done with all %d layer bytes", last, sawMkfs, a.art.LayerBytes)
	}

	// Ready digests convert nothing, in this Store or after a restart.
	again, err := s.Ensure(context.Background(), dgst)
	if err != nil || again.Size != a.art.Size || s.Conversions() != 1 {
		t.Errorf("second Ensure: %v, %d conversions; want the ready artifact and still 1", err, s.Conversions())
	}
	s2, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Ensure(context.Background(), dgst); err != nil || s2.Conversions() != 0 {
		t.Errorf("Ensure after reopening: %v, %d conversions; want the stored artifact and 0", err, s2.Conversions())
	}

	// Remove deletes it; the next Ensure converts again.
	if err := s.Remove(dgst); err != nil {
		t.Fatal(err)
	}
	if st, _ := s.Status(dgst); st != StatePending {
		t.Errorf("status after Remove = %s, want pending", st)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("by-digest holds %v after Remove", got)
	}
	if _, err := s.Ensure(context.Background(), dgst); err != nil || s.Conversions() != 2 {
		t.Errorf("Ensure after Remove: %v, %d conversions; want a second conversion", err, s.Conversions())
	}
}

func TestStoreCancelLeavesNothingBehind(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := bulkImage(t, r, "cancel/app", 2, 16, "")

	for _, phase := range []Phase{PhaseLayers, PhaseMkfs} {
		t.Run(string(phase), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			opt := Options{Progress: func(p Progress) {
				if p.Phase == phase && (phase != PhaseLayers || p.Applied > 0) {
					// Cancel a little later during mkfs, so the tool is
					// likely running and has to be killed.
					time.AfterFunc(map[Phase]time.Duration{PhaseLayers: 0, PhaseMkfs: 30 * time.Millisecond}[phase], cancel)
				}
			}}
			dir := t.TempDir()
			s, err := Open(dir, r.Registry, opt)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			_, err = s.Ensure(ctx, dgst)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Ensure = %v, want context.Canceled", err)
			}
			if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
				t.Errorf("a canceled conversion left %v behind", got)
			}
			if st, msg := s.Status(dgst); st != StatePending {
				t.Errorf("status after cancel = %s (%s), want pending", st, msg)
			}
			if _, err := s.Ensure(context.Background(), dgst); err != nil {
				t.Fatalf("Ensure after a canceled conversion: %v", err)
			}
			if st, _ := s.Status(dgst); st != StateReady {
				t.Errorf("status = %s, want ready", st)
			}
		})
	}
}

func TestStoreRemoveStopsRunningConversion(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := smallImage(t, r, "remove/app")
	started, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	dir := t.TempDir()
	s, err := Open(dir, r.Registry, Options{Progress: func(Progress) { once.Do(func() { close(started); <-gate }) }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	errc := make(chan error, 1)
	go func() { _, err := s.Ensure(context.Background(), dgst); errc <- err }()
	<-started
	removed := make(chan error, 1)
	go func() { removed <- s.Remove(dgst) }()
	waitFor(t, "Remove to cancel the conversion", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		c, ok := s.inflight[dgst]
		return !ok || c.removed
	})
	close(gate)
	if err := <-errc; !errors.Is(err, ErrRemoved) {
		t.Errorf("Ensure = %v, want ErrRemoved", err)
	}
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("by-digest holds %v after Remove", got)
	}
}

func TestStoreReportsFailure(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := r.pushImage(t, "fail/app", "v1", "arm64", v1.ImageConfig{}, makeLayer(t, "gzip", tarOf(t, fileE("x", "x", 0o644))))
	dir := t.TempDir()
	s, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Ensure(context.Background(), dgst); err == nil {
		t.Fatal("Ensure of an arm64-only image succeeded")
	}
	st, msg := s.Status(dgst)
	if st != StateFailed || !strings.Contains(msg, "linux/arm64") {
		t.Errorf("status = %s %q, want failed naming linux/arm64", st, msg)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("a failed conversion left %v behind", got)
	}
	if _, err := s.Ensure(context.Background(), "sha256:nothex"); err == nil {
		t.Error("Ensure accepted an invalid digest")
	}
	if _, err := s.Ensure(context.Background(), "sha256:"+strings.Repeat("0", 64)); err == nil || s.Conversions() != 2 {
		t.Errorf("Ensure of an unknown digest: %v", err)
	}
}

// TestConvertTiming converts a ~50 MB image and logs what it costs.
func TestConvertTiming(t *testing.T) {
	if testing.Short() {
		t.Skip("timing run")
	}
	requireTool(t, FormatErofs)
	requireTool(t, FormatExt4)
	r := startRegistry(t)
	dgst := bulkImage(t, r, "timing/app", 2, 25, "gzip")
	for _, opt := range []Options{{}, {Compression: "lz4hc"}, {Format: FormatExt4}} {
		res, err := Convert(context.Background(), r.Registry, dgst, filepath.Join(t.TempDir(), "out"), opt)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(res.RootFS())
		if err != nil {
			t.Fatal(err)
		}
		onDisk := fi.Sys().(*syscall.Stat_t).Blocks * 512
		t.Logf("%s%s: %.1f MiB of layers -> %.1f MiB image (%.1f MiB allocated) in %v (mkfs %v)", res.Format, map[bool]string{true: "+" + opt.Compression}[opt.Compression != ""],
			float64(res.LayerBytes)/(1<<20), float64(fi.Size())/(1<<20), float64(onDisk)/(1<<20), res.Duration.Round(time.Millisecond), res.Mkfs.Round(time.Millisecond))
	}
}
