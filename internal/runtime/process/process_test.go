package process

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

const volumeSize = 2 << 30

var registry string

func TestMain(m *testing.M) {
	testkit.MainWithRegistry(m, "process runtime tests need root (loop mounts, buildkitd)", &registry)
}

// newRuntime returns a Runtime whose state dir is removed after the test
// and checked for leftovers first.
func newRuntime(t *testing.T) *Runtime {
	t.Helper()
	// Short path: the buildkitd socket lives below it.
	stateDir, err := os.MkdirTemp("", "kp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A failed test may leave a build behind; never delete through a
		// mounted volume.
		if err := Reap(context.Background(), stateDir, nil); err != nil {
			t.Errorf("reap after test: %v", err)
		}
		if m, _ := buildkitd.MountsUnder(stateDir); len(m) == 0 {
			os.RemoveAll(stateDir)
		}
	})
	r, err := New(Config{BuildkitdPath: testkit.Buildkitd(t), StateDir: stateDir})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func job(id, volume string, req solve.Request) runtime.Job {
	return runtime.Job{
		BuildID:            id,
		Solve:              req,
		Volume:             volume,
		InsecureRegistries: []string{registry},
		GC:                 runtime.GCPolicy{ReservedSpace: "256MB", MaxUsedSpace: "1536MB", MinFreeSpace: "10%"},
	}
}

var (
	baseOnce sync.Once
	baseRef  string
	baseErr  error
)

// busyboxBase pushes the busybox base image through the runtime once.
func busyboxBase(t *testing.T) string {
	t.Helper()
	baseOnce.Do(func() {
		r := newRuntime(t)
		baseRef = registry + "/base/busybox:latest"
		_, baseErr = r.Run(ctx(t), job("base", testkit.Volume(t, volumeSize), solve.Request{
			ContextDir: testkit.BusyboxDir(t),
			Push:       []string{baseRef},
		}), nil)
	})
	if baseErr != nil {
		t.Fatalf("build busybox base: %v", baseErr)
	}
	return baseRef
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return c
}

// assertReleased fails unless the runtime left nothing behind: no state,
// no mount, no loop device, no buildkitd, no cgroup.
func assertReleased(t *testing.T, r *Runtime, volumes ...string) {
	t.Helper()
	entries, _ := os.ReadDir(r.cfg.StateDir)
	for _, e := range entries {
		t.Errorf("state dir still holds %s", e.Name())
	}
	if m, _ := buildkitd.MountsUnder(r.cfg.StateDir); len(m) > 0 {
		t.Errorf("still mounted: %v", m)
	}
	for _, v := range volumes {
		abs, _ := canonicalPath(v)
		if devs := loopDevicesFor(abs); len(devs) > 0 {
			t.Errorf("volume %s still attached to %v", v, devs)
		}
	}
	if pids := processesMentioning(r.cfg.StateDir); len(pids) > 0 {
		t.Errorf("processes still running from the state dir: %v", pids)
	}
	prefix := cgroupName(r.cfg.StateDir, "")
	if dirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + prefix + "*"); len(dirs) > 0 {
		t.Errorf("cgroups left behind: %v", dirs)
	}
}

func processesMentioning(s string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		raw, err := os.ReadFile(p)
		cmdline := strings.ReplaceAll(string(raw), "\x00", " ")
		if err == nil && strings.Contains(cmdline, s) {
			out = append(out, filepath.Base(filepath.Dir(p))+": "+cmdline)
		}
	}
	return out
}

func TestRunPushesScratchImageAndReleasesEverything(t *testing.T) {
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	ref := registry + "/builds/b1:latest"
	res, err := r.Run(ctx(t), job("b1", vol, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\nCOPY a.txt /a.txt\n", "a.txt": "A\n"}),
		Push:       []string{ref},
	}), rec)
	if err != nil {
		t.Fatal(err)
	}
	if !testkit.ManifestExists(t, registry+"/builds/b1@"+res.Digest) {
		t.Fatalf("registry does not serve digest %q", res.Digest)
	}
	if got := string(testkit.FetchImage(t, ref).Files["/a.txt"]); got != "A\n" {
		t.Errorf("/a.txt = %q", got)
	}
	var phases []string
	for _, e := range rec.Events() {
		if e.Kind == progress.Phase {
			phases = append(phases, e.Phase)
		}
	}
	if strings.Join(phases, ",") != PhaseStartingBuildkitd+","+PhaseSolving {
		t.Errorf("phases = %v", phases)
	}
	assertReleased(t, r, vol)
}

func TestWarmRebuildOnSameVolumeReusesLayersAndCacheMounts(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, testkit.WarmContext(base))
	build := func(id, bust string) (solve.Result, *testkit.Recorder, testkit.Image) {
		rec := &testkit.Recorder{}
		ref := registry + "/app/warm:" + id
		res, err := r.Run(ctx(t), job(id, vol, solve.Request{
			ContextDir: dir,
			Push:       []string{ref},
			BuildArgs:  map[string]string{"BUST": bust},
		}), rec)
		if err != nil {
			t.Fatalf("build %s: %v", id, err)
		}
		return res, rec, testkit.FetchImage(t, ref)
	}
	res1, _, img1 := build("warm1", "1")
	res2, rec2, img2 := build("warm2", "2")

	if res1.StepsCached != 0 {
		t.Errorf("cold build reported %d cached steps", res1.StepsCached)
	}
	if res2.StepsCached < 2 {
		t.Errorf("warm build: StepsCached=%d of %d, want the layer and stamp steps cached", res2.StepsCached, res2.StepsTotal)
	}
	testkit.CheckWarmRebuild(t, rec2, img1, img2)
	assertReleased(t, r, vol)
}

// TestUncleanlyReleasedVolumeStartsCold: a volume still mounted when its
// machine died (as a crash leaves it: the journal's needs_recovery flag,
// set here with debugfs) may record cache entries whose files never
// reached the disk. The next build must discard that cache, say so, and
// build cold; the one after it is warm again.
func TestUncleanlyReleasedVolumeStartsCold(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN echo layer > /layer\n"})
	build := func(id string) *testkit.Recorder {
		rec := &testkit.Recorder{}
		if _, err := r.Run(ctx(t), job(id, vol, solve.Request{ContextDir: dir, Push: []string{registry + "/app/unclean:" + id}}), rec); err != nil {
			t.Fatalf("build %s: %v", id, err)
		}
		return rec
	}
	build("before")
	if out, err := exec.Command("debugfs", "-w", "-R", "feature needs_recovery", vol).CombinedOutput(); err != nil {
		t.Fatalf("mark the volume as a crash leaves it: debugfs: %v\n%s", err, out)
	}
	rec := build("after-crash")
	if !rec.Contains("was not released cleanly") {
		t.Errorf("the build on the uncleanly released volume did not say its cache was discarded")
	}
	if len(rec.Find(progress.VertexCached, "echo layer")) != 0 {
		t.Errorf("the build on the uncleanly released volume answered a step from the cache it should have discarded")
	}
	rec = build("next")
	if rec.Contains("was not released cleanly") || len(rec.Find(progress.VertexCached, "echo layer")) != 1 {
		t.Errorf("the build after the discard should be warm again, without a discard")
	}
	assertReleased(t, r, vol)
}

// TestStepsGetOnlyTheMemoryTheBuildAskedFor: on the process runtime too,
// a build's memory_mb caps its steps. A step that needs 200 MiB is killed
// under 64 MiB and runs under 512.
func TestStepsGetOnlyTheMemoryTheBuildAskedFor(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN dd if=/dev/zero of=/dev/null bs=200M count=1\n"})
	run := func(id string, memMB int) error {
		j := job(id, vol, solve.Request{ContextDir: dir, NoCache: true})
		j.MemoryMB = memMB
		_, err := r.Run(ctx(t), j, nil)
		return err
	}
	err := run("mem64", 64)
	if err == nil {
		t.Fatalf("a step allocating 200 MiB succeeded in a build limited to 64 MiB")
	}
	if !strings.Contains(err.Error(), "137") {
		t.Errorf("err = %v, want the step killed (exit code 137)", err)
	}
	if err := run("mem512", 512); err != nil {
		t.Errorf("the same step under 512 MiB: %v", err)
	}
	assertReleased(t, r, vol)
}

func TestCancelStopsBuildkitdAndReleasesVolumePromptly(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	c := testkit.CancelWhenStarted(rec, "sleep 67", 2*time.Minute)
	_, err := r.Run(c.Ctx, job("cancel", vol, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN sleep 67\n"}),
		Push:       []string{registry + "/app/cancel:latest"},
	}), rec)
	took := c.Since(t, err)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	t.Logf("Run returned %s after cancel", took)
	if took > 10*time.Second {
		t.Errorf("Run took %s to return after cancel", took)
	}
	assertReleased(t, r, vol)
	if p := processesMentioning("sleep 67"); len(p) > 0 {
		t.Errorf("build step survived the cancel: %v", p)
	}
}

func TestConcurrentRunsOnDifferentVolumes(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vols := []string{testkit.Volume(t, volumeSize), testkit.Volume(t, volumeSize)}
	var wg sync.WaitGroup
	results := make([]solve.Result, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("par%d", i)
			results[i], errs[i] = r.Run(ctx(t), job(id, vols[i], solve.Request{
				ContextDir: testkit.ContextDir(t, map[string]string{
					"Dockerfile": "FROM " + base + "\nRUN sleep 1 && echo " + id + " > /id\n",
				}),
				Push: []string{registry + "/app/" + id + ":latest"},
			}), nil)
		}()
	}
	wg.Wait()
	for i := range 2 {
		if errs[i] != nil {
			t.Fatalf("build %d: %v", i, errs[i])
		}
		id := fmt.Sprintf("par%d", i)
		if got := string(testkit.FetchImage(t, registry+"/app/"+id+":latest").Files["/id"]); got != id+"\n" {
			t.Errorf("%s: /id = %q", id, got)
		}
	}
	assertReleased(t, r, vols...)
}

func TestRunRefusesVolumeThatIsAlreadyAttached(t *testing.T) {
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	other := t.TempDir()
	a, err := attachVolume(context.Background(), vol, filepath.Join(other, "m"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.release()
	_, err = r.Run(ctx(t), job("dup", vol, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\n"}),
	}), nil)
	if err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Fatalf("err = %v, want a refusal to attach the volume twice", err)
	}
	if entries, _ := os.ReadDir(r.cfg.StateDir); len(entries) != 0 {
		t.Errorf("refused run left state behind")
	}
}

// TestNewReapsLeftoversOfACrash simulates a server that died mid-build: a
// volume mounted under the state dir, a live buildkitd serving it and a
// build step running in it.
func TestNewReapsLeftoversOfACrash(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := filepath.Join(r.cfg.StateDir, "crashed")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	a, err := attachVolume(context.Background(), vol, filepath.Join(dir, "root"))
	if err != nil {
		t.Fatal(err)
	}
	if err := writeState(dir, buildState{Volume: a.file, Loop: a.device}); err != nil {
		t.Fatal(err)
	}
	d, err := buildkitd.Start(context.Background(), buildkitd.Config{
		Binary:             r.cfg.BuildkitdPath,
		Root:               a.mountPoint,
		Dir:                dir,
		Runc:               r.cfg.RuncPath,
		CgroupParent:       cgroupName(r.cfg.StateDir, "crashed"),
		InsecureRegistries: []string{registry},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Stop(context.Background()) })
	rec := &testkit.Recorder{}
	started := rec.Await(progress.VertexStarted, "sleep 62")
	solved := make(chan error, 1)
	go func() {
		_, err := solve.Run(ctx(t), d.Client(), solve.Request{
			ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN sleep 62\n"}),
		}, rec)
		solved <- err
	}()
	select {
	case <-started:
	case err := <-solved:
		t.Fatalf("solve ended before the step started: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("step did not start")
	}
	for deadline := time.Now().Add(30 * time.Second); len(processesMentioning("sleep 62")) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("test setup: the build step is not running")
		}
		time.Sleep(50 * time.Millisecond)
	}

	if _, err := New(r.cfg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Exited():
	case <-time.After(10 * time.Second):
		t.Fatalf("reap left buildkitd pid %d running", d.Pid())
	}
	if err := <-solved; err == nil {
		t.Error("solve succeeded although its daemon was reaped")
	}
	assertReleased(t, r, vol)
	if p := processesMentioning("sleep 62"); len(p) > 0 {
		t.Errorf("reap left the build step running: %v", p)
	}
}

// TestBuilderRunsJobsOfItsShapeAndForgetsEachJobsSecrets is builder reuse
// on the host: the second job runs on the first job's buildkitd (no start,
// warm cache, cache mount kept), cannot reach the first job's secret by
// any path, a job of another shape is refused, a canceled job leaves the
// builder unfit for reuse, and Stop leaves the volume clean.
func TestBuilderRunsJobsOfItsShapeAndForgetsEachJobsSecrets(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, testkit.WarmContext(base))
	const secret = "s3cr3t-of-build-one-7f1d"
	secretDir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
		"RUN --mount=type=secret,id=tok cp /run/secrets/tok /copied && wc -c /copied\n"})
	// Steps that would print the secret if anything of it were left where
	// a later build could look: the secret mount, the environment, and a
	// copy step like build 1's.
	snoop := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
		"RUN --mount=type=secret,id=tok,required=false cat /run/secrets/tok 2>&1; env; echo snooped\n" +
		"RUN --mount=type=secret,id=tok,required=false cp /run/secrets/tok /copied 2>/dev/null; cat /copied 2>&1; echo end\n"})

	first := job("b1", vol, solve.Request{ContextDir: secretDir, Push: []string{registry + "/app/reuse:secret"},
		Secrets: map[string][]byte{"tok": []byte(secret)}})
	b, err := r.StartBuilder(ctx(t), first, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background()) })
	if _, err := b.Run(ctx(t), first, nil); err != nil {
		t.Fatalf("build 1: %v", err)
	}

	rec := &testkit.Recorder{}
	if _, err := b.Run(ctx(t), job("b2", vol, solve.Request{ContextDir: snoop, Push: []string{registry + "/app/reuse:snoop"}}), rec); err != nil {
		t.Fatalf("build 2 on the reused builder: %v", err)
	}
	if !rec.Contains("snooped") {
		t.Fatalf("build 2's snooping step did not run; events:\n%s", rec.Logs())
	}
	if rec.Contains(secret) {
		t.Errorf("build 2 on a reused builder read build 1's secret:\n%s", rec.Logs())
	}
	if img := testkit.FetchImage(t, registry+"/app/reuse:snoop"); img.ContainsBytes([]byte(secret)) {
		t.Error("build 2's image holds build 1's secret")
	}
	for _, e := range rec.Events() {
		if e.Kind == progress.Phase && e.Phase == PhaseStartingBuildkitd {
			t.Error("build 2 started a buildkitd on a reused builder")
		}
	}

	// The warm-cache contract holds across builds on one builder.
	build := func(id, bust string) (*testkit.Recorder, testkit.Image) {
		rec := &testkit.Recorder{}
		ref := registry + "/app/reuse:" + id
		if _, err := b.Run(ctx(t), job(id, vol, solve.Request{ContextDir: dir, Push: []string{ref},
			BuildArgs: map[string]string{"BUST": bust}}), rec); err != nil {
			t.Fatalf("build %s: %v", id, err)
		}
		return rec, testkit.FetchImage(t, ref)
	}
	_, img1 := build("w1", "1")
	rec2, img2 := build("w2", "2")
	testkit.CheckWarmRebuild(t, rec2, img1, img2)
	if !b.Reusable() {
		t.Fatal("builder not reusable after builds that ended normally")
	}

	other := job("b3", vol, solve.Request{ContextDir: dir, Push: []string{registry + "/app/reuse:other"}})
	other.CPUs = 2
	if _, err := b.Run(ctx(t), other, nil); err == nil || !strings.Contains(err.Error(), "another shape") {
		t.Errorf("job of another shape: err = %v, want a refusal", err)
	}

	crec := &testkit.Recorder{}
	c := testkit.CancelWhenStarted(crec, "sleep 68", 2*time.Minute)
	_, err = b.Run(c.Ctx, job("b4", vol, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN sleep 68\n"}),
		Push:       []string{registry + "/app/reuse:cancel"},
	}), crec)
	if took := c.Since(t, err); !errors.Is(err, context.Canceled) || took > 10*time.Second {
		t.Errorf("cancel on a reused builder: err = %v after %s, want context.Canceled within 10s", err, took)
	}
	if b.Reusable() {
		t.Error("builder still reusable after a canceled build")
	}
	if err := b.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	assertReleased(t, r, vol)
	if p := processesMentioning("sleep 68"); len(p) > 0 {
		t.Errorf("build step survived cancel and stop: %v", p)
	}
	if out, err := exec.Command("e2fsck", "-fn", vol).CombinedOutput(); err != nil {
		t.Errorf("volume not clean after Stop: %v\n%s", err, out)
	}
}
