package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
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
	// Nothing of the work is left, only the record of the failure.
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 1 || got[0] != dgst {
		t.Errorf("by-digest holds %v after a failed conversion, want only %s", got, dgst)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest", dgst)); len(got) != 1 || got[0] != failedName {
		t.Errorf("a failed conversion left %v behind, want only the failure record", got)
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

// flakySource is a registry whose blob reads fail while down is set, as
// when the registry cannot serve them for a while.
type flakySource struct {
	Source
	down atomic.Bool
}

func (f *flakySource) Blob(ctx context.Context, dgst string) (io.ReadCloser, error) {
	if f.down.Load() {
		return nil, fmt.Errorf("open blob %s: registry temporarily unavailable", dgst)
	}
	return f.Source.Blob(ctx, dgst)
}

// oversizedConfigImage pushes an image whose config is over the limit.
func oversizedConfigImage(t *testing.T, r *testRegistry, repo string) string {
	t.Helper()
	return r.pushImage(t, repo, "v1", "amd64", v1.ImageConfig{Labels: map[string]string{"pad": strings.Repeat("x", maxConfigBytes)}},
		makeLayer(t, "gzip", tarOf(t, fileE("x", "x", 0o644))))
}

func TestStoreRemembersUnconvertibleImages(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := oversizedConfigImage(t, r, "toobig/app")
	dir := t.TempDir()
	s, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Ensure(context.Background(), dgst)
	if !errors.Is(err, ErrUnconvertible) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("Ensure of an image with an oversized config = %v, want ErrUnconvertible about the size", err)
	}
	msg := err.Error()
	if st, got := s.Status(dgst); st != StateFailed || got != msg {
		t.Errorf("status = %s %q, want failed %q", st, got, msg)
	}
	if _, err := s.Ensure(context.Background(), dgst); err == nil || err.Error() != msg || s.Conversions() != 1 {
		t.Errorf("second Ensure = %v after %d conversions, want the same failure and still 1", err, s.Conversions())
	}
	if got := listDir(t, filepath.Join(dir, "by-digest", dgst)); len(got) != 1 || got[0] != failedName {
		t.Errorf("the digest's directory holds %v, want only the failure record", got)
	}
	s.Close()

	// After a restart: still failed, with the same message, and Ensure
	// does not convert it again.
	s2, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if st, got := s2.Status(dgst); st != StateFailed || got != msg {
		t.Errorf("status after reopening = %s %q, want failed %q", st, got, msg)
	}
	_, err = s2.Ensure(context.Background(), dgst)
	if !errors.Is(err, ErrUnconvertible) || err.Error() != msg {
		t.Errorf("Ensure after reopening = %v, want ErrUnconvertible %q", err, msg)
	}
	if n := s2.Conversions(); n != 0 {
		t.Errorf("Ensure after reopening ran %d conversions, want 0", n)
	}
	if _, ok := s2.Get(dgst); ok {
		t.Error("Get found an artifact for a failed digest")
	}

	// Retry converts it again (and it fails again, and is recorded again).
	if err := s2.Retry(dgst); err != nil {
		t.Fatal(err)
	}
	if st, got := s2.Status(dgst); st != StatePending {
		t.Errorf("status after Retry = %s %q, want pending", st, got)
	}
	if _, err := s2.Ensure(context.Background(), dgst); !errors.Is(err, ErrUnconvertible) || s2.Conversions() != 1 {
		t.Errorf("Ensure after Retry = %v after %d conversions, want ErrUnconvertible from 1", err, s2.Conversions())
	}
	if st, _ := s2.Status(dgst); st != StateFailed {
		t.Errorf("status after the retried conversion = %s, want failed", st)
	}

	// Remove forgets it for good.
	if err := s2.Remove(dgst); err != nil {
		t.Fatal(err)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("by-digest holds %v after Remove", got)
	}
	s3, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if st, got := s3.Status(dgst); st != StatePending {
		t.Errorf("status after Remove and reopening = %s %q, want pending", st, got)
	}
}

func TestStoreRetriesTransientFailures(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := smallImage(t, r, "transient/app")
	src := &flakySource{Source: r.Registry}
	src.down.Store(true)
	dir := t.TempDir()
	s, err := Open(dir, src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Ensure(context.Background(), dgst)
	if err == nil || errors.Is(err, ErrUnconvertible) {
		t.Fatalf("Ensure with the registry down = %v, want a failure that is not ErrUnconvertible", err)
	}
	if st, msg := s.Status(dgst); st != StateFailed || !strings.Contains(msg, "temporarily unavailable") {
		t.Errorf("status = %s %q, want failed naming the registry error", st, msg)
	}
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("a transient failure left %v on disk", got)
	}
	s.Close()

	// A restart forgets it; with the registry back the digest converts.
	src.down.Store(false)
	s2, err := Open(dir, src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if st, msg := s2.Status(dgst); st != StatePending {
		t.Errorf("status after reopening = %s %q, want pending", st, msg)
	}

	// A canceled conversion is no failure at all.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	canceling, err := Open(dir, src, Options{Progress: func(Progress) { cancel() }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := canceling.Ensure(ctx, dgst); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ensure canceled during the conversion = %v, want context.Canceled", err)
	}
	if st, msg := canceling.Status(dgst); st != StatePending {
		t.Errorf("status after cancel = %s %q, want pending", st, msg)
	}
	canceling.Close()
	if got := listDir(t, filepath.Join(dir, "by-digest")); len(got) != 0 {
		t.Errorf("a canceled conversion left %v on disk", got)
	}
	if st, msg := s2.Status(dgst); st != StatePending {
		t.Errorf("status after cancel = %s %q, want pending", st, msg)
	}
	if _, err := s2.Ensure(context.Background(), dgst); err != nil || s2.Conversions() != 1 {
		t.Errorf("Ensure after the failures = %v after %d conversions, want the artifact from 1", err, s2.Conversions())
	}
}

func TestStoreFailureRecordIsPerPlatform(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	dgst := r.pushImage(t, "armonly/app", "v1", "arm64", v1.ImageConfig{}, makeLayer(t, "gzip", tarOf(t, fileE("x", "x", 0o644))))
	dir := t.TempDir()
	s, err := Open(dir, r.Registry, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Ensure(context.Background(), dgst); !errors.Is(err, ErrUnconvertible) {
		t.Fatalf("Ensure of an arm64 image for linux/amd64 = %v, want ErrUnconvertible", err)
	}
	s.Close()
	// A store for the image's platform converts it, replacing the record.
	arm, err := Open(dir, r.Registry, Options{Platform: "linux/arm64"})
	if err != nil {
		t.Fatal(err)
	}
	defer arm.Close()
	if st, msg := arm.Status(dgst); st != StatePending {
		t.Errorf("status for linux/arm64 = %s %q, want pending", st, msg)
	}
	if _, err := arm.Ensure(context.Background(), dgst); err != nil {
		t.Fatalf("Ensure for linux/arm64: %v", err)
	}
	if st, _ := arm.Status(dgst); st != StateReady {
		t.Errorf("status = %s, want ready", st)
	}
}

// TestConvertClassifiesFailures checks which failures are the image's own
// (ErrUnconvertible) and which may pass.
func TestConvertClassifiesFailures(t *testing.T) {
	requireTool(t, FormatErofs)
	r := startRegistry(t)
	good := makeLayer(t, "gzip", tarOf(t, fileE("data", strings.Repeat("d", 10000), 0o644)))
	truncated := makeLayer(t, "", tarOf(t, fileE("data", strings.Repeat("d", 10000), 0o644)))
	truncated.blob = truncated.blob[:3000]
	truncated.diffID = digestOf(digest.FromBytes(truncated.blob).String())
	badGzip := testLayer{mediaType: v1.MediaTypeImageLayerGzip, blob: []byte{0x1f, 0x8b, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 1, 2, 3}}
	badGzip.diffID = digest.FromBytes(badGzip.blob)
	wrongDiffID := good
	wrongDiffID.diffID = digest.FromString("something else")
	// Damage stored layers in the registry's own storage: one in file
	// data, which only the digest check notices, one in a tar header,
	// which fails to parse before that.
	corrupted := func(repo string, at func(n int) int) string {
		l := makeLayer(t, "", tarOf(t, fileE("data", strings.Repeat(repo, 1000), 0o644)))
		dgst := r.pushImage(t, repo, "v1", "amd64", v1.ImageConfig{}, l)
		sum := digest.FromBytes(l.blob).Encoded()
		blob := filepath.Join(r.Root, "docker/registry/v2/blobs/sha256", sum[:2], sum, "data")
		b, err := os.ReadFile(blob)
		if err != nil {
			t.Fatal(err)
		}
		b[at(len(b))] ^= 0xff
		if err := os.WriteFile(blob, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return dgst
	}
	down := &flakySource{Source: r.Registry}
	down.down.Store(true)

	for _, c := range []struct {
		name      string
		src       Source
		dgst      string
		permanent bool
	}{
		{"config over the limit", r.Registry, oversizedConfigImage(t, r, "classify/big"), true},
		{"other platform", r.Registry, r.pushImage(t, "classify/arm", "v1", "arm64", v1.ImageConfig{}, good), true},
		{"truncated tar", r.Registry, r.pushImage(t, "classify/trunc", "v1", "amd64", v1.ImageConfig{}, truncated), true},
		{"bad gzip", r.Registry, r.pushImage(t, "classify/gzip", "v1", "amd64", v1.ImageConfig{}, badGzip), true},
		{"diff_id mismatch", r.Registry, r.pushImage(t, "classify/diffid", "v1", "amd64", v1.ImageConfig{}, wrongDiffID), true},
		{"corrupt stored copy", r.Registry, corrupted("classify/corrupt", func(n int) int { return n / 2 }), false},
		{"corrupt stored tar header", r.Registry, corrupted("classify/header", func(int) int { return 10 }), false},
		{"registry down", down, r.pushImage(t, "classify/down", "v1", "amd64", v1.ImageConfig{}, good), false},
		{"unknown digest", r.Registry, "sha256:" + strings.Repeat("0", 64), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Convert(context.Background(), c.src, c.dgst, filepath.Join(t.TempDir(), "out"), Options{})
			if err == nil {
				t.Fatal("Convert succeeded")
			}
			t.Log(err)
			if got := errors.Is(err, ErrUnconvertible); got != c.permanent {
				t.Errorf("Convert = %v; ErrUnconvertible %v, want %v", err, got, c.permanent)
			}
		})
	}
}
