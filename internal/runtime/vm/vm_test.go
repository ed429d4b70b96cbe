package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/egress"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

const volumeSize = 2 << 30

var (
	// registry is where the test registry really listens on the host.
	registry string
	// guestRegistry is the registry host the builds name. Nothing listens
	// there on the host: a build can only reach it through the guest's
	// registry tunnel, so a pushed image proves the tunnel works.
	guestRegistry = "127.0.0.1:5999"
	// namedRegistry is the same registry named by a host name, as an
	// operator's registry_host may be; only the guest's hosts file knows it.
	namedRegistry = "registry.kiln.test:5999"
)

func TestMain(m *testing.M) {
	testkit.MainWithRegistry(m, "vm runtime tests need root (QEMU disk locks, loop mounts for the fsck checks)", &registry)
}

// builderImage is the builder image the tests of this tree share.
func builderImage(t testing.TB) builderimage.Manifest {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatalf("qemu-system-x86_64 is missing: %v; install it with `apt-get install -y qemu-system-x86`", err)
	}
	return testkit.BuilderImage(t)
}

// newRuntime returns a Runtime whose state dir is checked for leftovers
// and removed after the test.
func newRuntime(t testing.TB) *Runtime {
	t.Helper()
	m := builderImage(t)
	stateDir, err := os.MkdirTemp("", "kvm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Reap(context.Background(), stateDir, nil); err != nil {
			t.Errorf("reap after test: %v", err)
		}
		os.RemoveAll(stateDir)
	})
	r, err := New(Config{Image: m, StateDir: stateDir, RegistryAddr: registry, Console: consoleWriter(),
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func job(id, volume string, memMB int, req solve.Request) runtime.Job {
	return runtime.Job{
		BuildID:            id,
		Solve:              req,
		Volume:             volume,
		InsecureRegistries: []string{guestRegistry},
		GC:                 runtime.GCPolicy{ReservedSpace: "256MB", MaxUsedSpace: "1536MB", MinFreeSpace: "10%"},
		CPUs:               2,
		MemoryMB:           memMB,
		Network:            "isolated",
	}
}

var (
	baseOnce sync.Once
	baseErr  error
	baseTook time.Duration
)

// busyboxBase pushes the busybox base image through a builder VM once and
// returns its name as builds write it.
func busyboxBase(t testing.TB) string {
	t.Helper()
	baseOnce.Do(func() {
		r := newRuntime(t)
		start := time.Now()
		_, baseErr = r.Run(ctx(t, 5*time.Minute), job("base", testkit.Volume(t, volumeSize), 1024, solve.Request{
			ContextDir: testkit.BusyboxDir(t),
			Push:       []string{guestRegistry + "/base/busybox:latest"},
		}), nil)
		baseTook = time.Since(start)
		t.Logf("busybox base built and pushed from a VM in %s", baseTook.Round(time.Millisecond))
	})
	if baseErr != nil {
		t.Fatalf("build busybox base: %v", baseErr)
	}
	return guestRegistry + "/base/busybox:latest"
}

// onHost turns a reference the builds use into one the host can fetch.
func onHost(ref string) string {
	for _, g := range []string{guestRegistry, namedRegistry} {
		if rest, ok := strings.CutPrefix(ref, g); ok {
			return registry + rest
		}
	}
	return ref
}

func ctx(t testing.TB, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}

// consoleWriter streams VM consoles to stderr when KILN_TEST_CONSOLE=1.
func consoleWriter() io.Writer {
	if os.Getenv("KILN_TEST_CONSOLE") != "1" {
		return nil
	}
	return os.Stderr
}

// assertReleased fails unless the runtime left nothing behind: no state
// dir entry, no QEMU, nothing holding the volumes open.
func assertReleased(t testing.TB, r *Runtime, volumes ...string) {
	t.Helper()
	entries, _ := os.ReadDir(r.cfg.StateDir)
	for _, e := range entries {
		t.Errorf("state dir still holds %s", e.Name())
	}
	if pids := qemuMentioning(r.cfg.StateDir); len(pids) > 0 {
		t.Errorf("QEMU processes still running for this runtime: %v", pids)
	}
	for _, v := range volumes {
		if holders := openedBy(v); len(holders) > 0 {
			t.Errorf("volume %s still open in processes %v", v, holders)
		}
	}
}

func qemuMentioning(s string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		raw, err := os.ReadFile(p)
		cmdline := strings.ReplaceAll(string(raw), "\x00", " ")
		if err == nil && strings.Contains(cmdline, "qemu") && strings.Contains(cmdline, s) {
			out = append(out, filepath.Base(filepath.Dir(p))+": "+cmdline)
		}
	}
	return out
}

// openedBy lists the processes with path open.
func openedBy(path string) []string {
	var out []string
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && target == path {
			out = append(out, strings.Split(fd, "/")[2])
		}
	}
	return out
}

func phases(rec *testkit.Recorder) []string {
	var out []string
	for _, e := range rec.Events() {
		if e.Kind == progress.Phase {
			out = append(out, e.Phase)
		}
	}
	return out
}

// breakdown splits a build's wall time by its events: boot (QEMU start to
// the agent's hello), agent setup (volume, context, buildkitd), solve and
// push, and the VM's shutdown after the result.
func breakdown(rec *testkit.Recorder, total time.Duration) string {
	var start, booted, solving, last time.Time
	for _, e := range rec.Events() {
		switch {
		case e.Kind == progress.Phase && e.Phase == PhaseBooting:
			start = e.Time
		case e.Kind == progress.Message && strings.HasPrefix(e.Message, "builder VM booted"):
			booted = e.Time
		case e.Kind == progress.Phase && e.Phase == "solving":
			solving = e.Time
		}
		last = e.Time
	}
	if start.IsZero() || booted.IsZero() || solving.IsZero() {
		return "no phase events"
	}
	ms := func(d time.Duration) time.Duration { return d.Round(10 * time.Millisecond) }
	return fmt.Sprintf("boot %s, agent setup + buildkitd %s, solve + push %s, rest (shutdown, teardown) %s",
		ms(booted.Sub(start)), ms(solving.Sub(booted)), ms(last.Sub(solving)), ms(total-last.Sub(start)))
}

// TestColdThenWarmBuildAcrossVMs runs one build twice on the same cache
// volume, each in its own VM: the second must answer the unchanged steps
// from the volume's cache and see the first build's cache mount.
func TestColdThenWarmBuildAcrossVMs(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	dir := testkit.ContextDir(t, testkit.WarmContext(base))
	build := func(id, bust string) (solve.Result, *testkit.Recorder, testkit.Image, time.Duration) {
		rec := &testkit.Recorder{}
		ref := guestRegistry + "/app/warm:" + id
		start := time.Now()
		res, err := r.Run(ctx(t, 3*time.Minute), job(id, vol, 1024, solve.Request{
			ContextDir: dir,
			Push:       []string{ref},
			BuildArgs:  map[string]string{"BUST": bust},
		}), rec)
		took := time.Since(start)
		if err != nil {
			t.Fatalf("build %s: %v", id, err)
		}
		assertReleased(t, r, vol)
		return res, rec, testkit.FetchImage(t, onHost(ref)), took
	}
	res1, rec1, img1, cold := build("cold", "1")
	res2, rec2, img2, warm := build("warm", "2")
	t.Logf("cold build %s: %s", cold.Round(time.Millisecond), breakdown(rec1, cold))
	t.Logf("warm build %s: %s; %d of %d steps cached", warm.Round(time.Millisecond), breakdown(rec2, warm), res2.StepsCached, res2.StepsTotal)

	// A guest frozen under TCG is replaced by a new VM, once, and the
	// build says so: then each VM shows its phases.
	want := "booting,starting buildkitd,solving"
	if len(rec1.Find(progress.Message, "builder VM stopped responding")) > 0 {
		want += "," + want
	}
	if got := strings.Join(phases(rec1), ","); got != want {
		t.Errorf("phases = %s, want %s", got, want)
	}
	if res1.StepsCached != 0 {
		t.Errorf("cold build reported %d cached steps", res1.StepsCached)
	}
	testkit.CheckWarmRebuild(t, rec2, img1, img2)
	if !testkit.ManifestExists(t, onHost(guestRegistry+"/app/warm@"+res2.Digest)) {
		t.Errorf("registry does not serve the reported digest %s", res2.Digest)
	}
	// A successful build unmounts the volume before the VM ends.
	if dirty := volumeNeedsRecovery(t, vol); dirty {
		t.Errorf("volume needs journal recovery after a successful build: the agent did not unmount it")
	}
}

// TestIsolatedBuildReachesNothingAndFailsWithTheStepError: an isolated
// build's steps see no network card and no proxy, and a failing RUN is
// the build's error while the VM still ends by itself with the volume
// released.
func TestIsolatedBuildReachesNothingAndFailsWithTheStepError(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	_, err := r.Run(ctx(t, 3*time.Minute), job("fail", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
			"RUN echo \"nics=$(ls /sys/class/net | tr '\\n' ' ')proxy=${HTTP_PROXY:-none}\"; " +
			"if nc 127.0.0.1 3128 </dev/null; then echo egress-reachable; fi; echo about to fail && exit 3\n"}),
		Push: []string{guestRegistry + "/app/fail:latest"},
	}), rec)
	if err == nil {
		t.Fatal("a failing RUN step succeeded")
	}
	if !strings.Contains(err.Error(), "exit code: 3") || strings.Contains(err.Error(), "console") {
		t.Errorf("error should be the step's failure, not a VM problem: %v", err)
	}
	logs := rec.Logs()
	if !strings.Contains(logs, "about to fail") {
		t.Errorf("the step's output did not reach the host")
	}
	if !strings.Contains(logs, "nics=lo proxy=none") || strings.Contains(logs, "egress-reachable") {
		t.Errorf("isolated step saw a network beyond loopback or a proxy:\n%s", logs)
	}
	assertReleased(t, r, vol)
	if volumeNeedsRecovery(t, vol) {
		t.Errorf("volume left mounted after a failed build")
	}
}

// TestEgressReachesOnlyAllowedDomains: with allowed domains, steps get an
// HTTP proxy inside the guest that the host serves through the egress
// tunnel; an allowed domain answers, any other is refused with 403 and a
// message in the build's events, and the proxy settings stay out of the
// image. The build pushes to kiln's registry by a host name that is not
// allowed: buildkitd, which uses the proxy too, must reach that name
// through its tunnel, not the proxy.
func TestEgressReachesOnlyAllowedDomains(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	site := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprintf(w, "hello from %s%s", req.Host, req.URL.Path)
	}))
	defer site.Close()
	// app.test stands for a public site: it resolves to a documentation
	// address, and the proxy's connection to it lands on the local server.
	public := netip.MustParseAddr("203.0.113.7")
	r.egressHook = func(c *egress.Config) {
		c.Resolve = func(context.Context, string) ([]netip.Addr, error) { return []netip.Addr{public}, nil }
		c.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr != "203.0.113.7:80" {
				return nil, fmt.Errorf("test dialer: unexpected %s", addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, site.Listener.Addr().String())
		}
	}
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	fetch := func(host, out string) string {
		return `(printf 'GET http://` + host + `/x HTTP/1.0\r\nHost: ` + host + `\r\n\r\n'; sleep 3) | nc ${p%:*} ${p##*:} > ` + out
	}
	j := job("egress", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
			"RUN echo \"$HTTP_PROXY\" > /proxy && p=${HTTP_PROXY#http://} && " + fetch("app.test", "/allowed") + " && " + fetch("evil.test", "/denied") + "\n"}),
		Push: []string{namedRegistry + "/app/egress:latest"},
	})
	j.Network, j.AllowedDomains = "egress", []string{"app.test"}
	j.InsecureRegistries = append(j.InsecureRegistries, namedRegistry)
	if _, err := r.Run(ctx(t, 3*time.Minute), j, rec); err != nil {
		t.Fatalf("%v\nlogs:\n%s", err, rec.Logs())
	}
	if rec.Contains("egress proxy refused registry.kiln.test") {
		t.Errorf("buildkitd asked the egress proxy for kiln's registry")
	}
	img := testkit.FetchImage(t, onHost(namedRegistry+"/app/egress:latest"))
	if got := string(img.Files["/proxy"]); got != "http://"+egressListen+"\n" {
		t.Errorf("HTTP_PROXY in the step = %q", got)
	}
	if got := string(img.Files["/allowed"]); !strings.Contains(got, " 200 ") || !strings.Contains(got, "hello from app.test/x") {
		t.Errorf("allowed domain through the proxy answered:\n%s", got)
	}
	if got := string(img.Files["/denied"]); !strings.Contains(got, " 403 ") || !strings.Contains(got, "allowed domains") {
		t.Errorf("other domain through the proxy answered:\n%s", got)
	}
	if !rec.Contains("egress proxy refused evil.test:80") {
		t.Errorf("the refusal is not in the build's events")
	}
	for _, e := range img.Config.Config.Env {
		if strings.Contains(strings.ToUpper(e), "PROXY") {
			t.Errorf("proxy setting leaked into the image: %s", e)
		}
	}
	assertReleased(t, r, vol)
}

// TestEgressWithoutListGetsAUserModeNIC: egress with no allowed domains
// gives the guest a user-mode NIC, so steps reach what the host reaches
// (here a server on the host's own network address) without any proxy,
// while the host's loopback, which slirp's gateway address stands for,
// stays unreachable. The build also pushes to kiln's registry by a host
// name, which only the guest's hosts file resolves (to its tunnel).
func TestEgressWithoutListGetsAUserModeNIC(t *testing.T) {
	hostIP := nonLoopbackIPv4(t)
	base := busyboxBase(t)
	r := newRuntime(t)
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	site := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprintf(w, "hello via %s", req.Host)
	})}
	go site.Serve(ln)
	defer site.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)

	// busybox-static's wget crashes in glibc's static resolver; nc does not.
	get := func(ip, out string) string {
		return `(printf 'GET / HTTP/1.0\r\nHost: ` + ip + `\r\n\r\n'; sleep 2) | nc -w 5 ` + ip + " " + port + " > " + out
	}
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	j := job("nic", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
			"RUN echo \"nics=$(ls /sys/class/net | tr '\\n' ' ')proxy=${HTTP_PROXY:-none}\" > /net && cat /etc/resolv.conf > /resolv && " +
			get(hostIP, "/public") + " && (" + get(microvm.UserNetGateway, "/loopback") + " || echo unreachable > /loopback)\n"}),
		Push: []string{namedRegistry + "/app/nic:latest"},
	})
	j.Network = "egress"
	j.InsecureRegistries = append(j.InsecureRegistries, namedRegistry)
	if _, err := r.Run(ctx(t, 3*time.Minute), j, rec); err != nil {
		t.Fatalf("%v\nlogs:\n%s", err, rec.Logs())
	}
	img := testkit.FetchImage(t, onHost(namedRegistry+"/app/nic:latest"))
	if got := string(img.Files["/net"]); got != "nics=eth0 lo proxy=none\n" {
		t.Errorf("step saw %q, want a NIC besides loopback and no proxy", got)
	}
	if got := string(img.Files["/resolv"]); got != "nameserver "+microvm.UserNetDNS+"\n" {
		t.Errorf("step's resolv.conf = %q", got)
	}
	if got, want := string(img.Files["/public"]), "hello via "+hostIP; !strings.Contains(got, " 200 ") || !strings.HasSuffix(got, want) {
		t.Errorf("server on the host's network address answered %q, want %q", got, want)
	}
	if got := string(img.Files["/loopback"]); got != "unreachable\n" {
		t.Errorf("the host's loopback was reachable through slirp's gateway address: %q", got)
	}
	assertReleased(t, r, vol)
}

// nonLoopbackIPv4 is an address of this host that a user-mode NIC's
// connections can reach.
func nonLoopbackIPv4(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	t.Skip("this host has no non-loopback IPv4 address for the guest to reach")
	return ""
}

// TestCancelStopsTheVMWithinTwoSeconds cancels a running build: Run must
// return, with the VM gone, within 2s, and the volume must still be
// usable by the next build.
func TestCancelStopsTheVMWithinTwoSeconds(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	c := testkit.CancelWhenStarted(rec, "sleep 67", 2*time.Minute)
	_, err := r.Run(c.Ctx, job("cancel", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN dd if=/dev/zero of=/big bs=1M count=64 && sleep 67\n"}),
		Push:       []string{guestRegistry + "/app/cancel:latest"},
	}), rec)
	took := c.Since(t, err)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	t.Logf("Run returned %s after cancel: %v", took.Round(time.Millisecond), err)
	if took > 2*time.Second {
		t.Errorf("Run took %s to return after cancel, want the VM gone within 2s", took)
	}
	assertReleased(t, r, vol)
	checkVolumeRecovers(t, vol)
}

// TestKilledVMLeavesARecoverableVolume kills QEMU while a step writes to
// the volume, as a host crash would: Run must report the dead VM with its
// console, leave nothing behind, and the volume must come back clean once
// its journal is replayed.
func TestKilledVMLeavesARecoverableVolume(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	// Let the step write for a while, then kill QEMU under it.
	killed := signalQEMU(r, rec, "killed", "while true", 2*time.Second, syscall.SIGKILL)
	_, err := r.Run(ctx(t, 3*time.Minute), job("killed", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\n" +
			"RUN --mount=type=cache,target=/c i=0; while true; do i=$((i+1)); dd if=/dev/zero of=/c/f$((i%50)) bs=64k count=16 2>/dev/null; echo $i > /n$((i%20)); done\n"}),
		Push: []string{guestRegistry + "/app/killed:latest"},
	}), rec)
	pid, ok := <-killed
	if !ok {
		t.Fatalf("the writing step never started: %v", err)
	}
	if !errors.Is(err, guest.ErrAgentGone) || !strings.Contains(err.Error(), "console") {
		t.Fatalf("err = %v, want the agent reported gone with the VM console", err)
	}
	t.Logf("killed QEMU %d mid-step; Run said: %.300s", pid, err)
	assertReleased(t, r, vol)
	if !volumeNeedsRecovery(t, vol) {
		t.Fatalf("volume is marked clean although its VM was killed mid-write; the test did not kill it mid-write")
	}
	checkVolumeRecovers(t, vol)
}

// signalQEMU sends sig to build's QEMU after a step whose name contains
// step has run for after, and then sends its PID. The channel closes
// without one if the step does not start within 2 minutes.
func signalQEMU(r *Runtime, rec *testkit.Recorder, build, step string, after time.Duration, sig syscall.Signal) <-chan int {
	started := rec.Await(progress.VertexStarted, step)
	out := make(chan int, 1)
	go func() {
		defer close(out)
		select {
		case <-started:
		case <-time.After(2 * time.Minute):
			return
		}
		time.Sleep(after)
		if pid := qemuPID(r, build); pid > 0 {
			syscall.Kill(pid, sig)
			out <- pid
		}
	}()
	return out
}

// qemuPID is the QEMU process of the builder running a build, from the
// state files; 0 if there is none.
func qemuPID(r *Runtime, buildID string) int {
	files, _ := filepath.Glob(filepath.Join(r.cfg.StateDir, "*", stateFileName))
	for _, f := range files {
		var st builderState
		data, err := os.ReadFile(f)
		if err == nil && json.Unmarshal(data, &st) == nil && st.BuildID == buildID {
			return st.PID
		}
	}
	return 0
}

// TestFrozenVMIsReplacedByANewOne freezes QEMU mid-step (SIGSTOP keeps
// its channel open, as a hung guest kernel does, so nothing closes): the
// runtime must notice within Unresponsive, kill that VM, and run the
// build again in a new one, which succeeds, and the build's progress says
// what happened.
func TestFrozenVMIsReplacedByANewOne(t *testing.T) {
	base := busyboxBase(t)
	r := newRuntime(t)
	r.cfg.Unresponsive = 10 * time.Second
	vol := testkit.Volume(t, volumeSize)
	rec := &testkit.Recorder{}
	frozen := signalQEMU(r, rec, "frozen", "frozen-step", 0, syscall.SIGSTOP)
	start := time.Now()
	res, err := r.Run(ctx(t, 4*time.Minute), job("frozen", vol, 512, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM " + base + "\nRUN echo frozen-step && sleep 2 && echo ran > /ran\n"}),
		Push:       []string{guestRegistry + "/app/frozen:latest"},
	}), rec)
	pid, ok := <-frozen
	if !ok {
		t.Fatalf("the step never started in the first VM: %v", err)
	}
	if err != nil {
		t.Fatalf("after QEMU %d froze, the build should have run again in a new VM and succeeded: %v\nlogs:\n%s", pid, err, rec.Logs())
	}
	t.Logf("QEMU %d frozen mid-step; Run succeeded in a second VM after %s", pid, time.Since(start).Round(time.Millisecond))
	if !rec.Contains("stopped responding") || !rec.Contains("attempt 2 of 2") {
		t.Errorf("the build's progress does not say its VM stopped responding and the build ran again")
	}
	if r.accel == microvm.AccelTCG && !rec.Contains(", 1 CPU)") {
		var said []string
		for _, e := range rec.Events() {
			if e.Kind == progress.Message {
				said = append(said, e.Message)
			}
		}
		t.Errorf("under TCG the second VM should have one vCPU; the build's messages: %q", said)
	}
	// The frozen VM's page cache died with it; what BuildKit recorded on
	// the volume is not trusted (its base image came back as
	// "exec format error" before the cache was discarded).
	if !rec.Contains("was not released cleanly") {
		t.Errorf("the second VM did not discard the cache the frozen one left half-written")
	}
	if res.Digest == "" || !testkit.ManifestExists(t, onHost(guestRegistry+"/app/frozen@"+res.Digest)) {
		t.Errorf("the registry does not hold the image %q the second VM reported", res.Digest)
	}
	if syscall.Kill(pid, 0) == nil {
		t.Errorf("the frozen QEMU %d is still there", pid)
	}
	assertReleased(t, r, vol)
}

// volumeNeedsRecovery reports whether the volume's ext4 journal has
// transactions to replay, i.e. it was not cleanly unmounted.
func volumeNeedsRecovery(t testing.TB, vol string) bool {
	t.Helper()
	out, err := exec.Command("dumpe2fs", "-h", vol).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs %s: %v\n%s", vol, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "Filesystem features:") {
			return strings.Contains(line, "needs_recovery")
		}
	}
	t.Fatalf("dumpe2fs printed no features:\n%s", out)
	return false
}

// checkVolumeRecovers is what "fsck-clean after a kill" honestly means
// for a journaled filesystem: a VM killed mid-write leaves transactions
// in the journal and orphan inodes, which e2fsck -n (it may not write)
// reports as problems; the next mount replays the journal and cleans the
// orphans first. So: on a copy (the original stays as the next build
// finds it), mount once as the next VM would, unmount, and then a full
// e2fsck -fn must find nothing at all.
func checkVolumeRecovers(t testing.TB, vol string) {
	t.Helper()
	dir := t.TempDir()
	cp := filepath.Join(dir, "copy.ext4")
	if out, err := exec.Command("cp", "--sparse=always", vol, cp).CombinedOutput(); err != nil {
		t.Fatalf("copy volume: %v\n%s", err, out)
	}
	raw, rawErr := exec.Command("e2fsck", "-fn", cp).CombinedOutput()
	t.Logf("before journal replay, e2fsck -fn says (%v):\n%s", rawErr, lastLines(string(raw), 8))
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", "-o", "loop", "-t", "ext4", cp, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount the killed volume (journal replay): %v\n%s", err, out)
	}
	if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v\n%s", err, out)
	}
	out, err := exec.Command("e2fsck", "-fn", cp).CombinedOutput()
	if err != nil {
		t.Fatalf("after journal replay the volume is not clean: e2fsck -fn: %v\n%s", err, out)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestBootTimeoutLeavesNothing: a VM whose agent does not say hello in
// time fails the build with the VM's console, and is gone with nothing
// left behind.
func TestBootTimeoutLeavesNothing(t *testing.T) {
	r := newRuntime(t)
	r.cfg.HelloTimeout = 300 * time.Millisecond // far less than a boot takes
	vol := testkit.Volume(t, 64<<20)
	start := time.Now()
	_, err := r.Run(ctx(t, time.Minute), job("slowboot", vol, 256, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\n"}),
		Push:       []string{guestRegistry + "/app/slowboot:latest"},
	}), nil)
	if err == nil || !strings.Contains(err.Error(), "did not say hello") || !strings.Contains(err.Error(), "console") {
		t.Fatalf("err = %v, want a boot timeout with the VM console", err)
	}
	t.Logf("boot timeout reported after %s", time.Since(start).Round(time.Millisecond))
	assertReleased(t, r, vol)
}

// TestNewReapsLeftoverVMs: a server that crashed mid-build leaves a QEMU
// and its state dir; the next New kills the one and removes the other.
func TestNewReapsLeftoverVMs(t *testing.T) {
	m := builderImage(t)
	stateDir, err := os.MkdirTemp("", "kvm-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(stateDir)
	id, err := newBuilderID()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(stateDir, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	vol := testkit.Volume(t, 64<<20)
	// Start the VM as Run does, but never serve it, as if the server died.
	vm, err := microvm.Start(context.Background(), microvm.Config{
		Kernel: m.KernelPath(), Initrd: m.InitramfsPath(), Cmdline: m.Cmdline, MemoryMiB: 256, CPUs: 1,
		Disks: []microvm.Disk{{Path: m.RootfsPath(), Serial: builderimage.RootSerial, ReadOnly: true},
			{Path: vol, Serial: builderimage.CacheSerial}},
		Ports: []string{builderimage.AgentPort}, RunDir: dir,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	if err := writeState(dir, builderState{Builder: id, BuildID: "crashed", Volume: vol, PID: vm.PID()}); err != nil {
		t.Fatal(err)
	}
	// A QEMU of another state dir whose path merely starts the same must
	// survive: only this state dir's VMs are reaped.
	bystander := &exec.Cmd{Path: "/bin/sh", Args: []string{"qemu-system-x86_64", "-c", "sleep 60; :", stateDir + "x/" + id + "/s1.sock"}}
	if err := bystander.Start(); err != nil {
		t.Fatal(err)
	}
	defer bystander.Process.Kill()

	if _, err := New(Config{Image: m, StateDir: stateDir, RegistryAddr: registry}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the leftover QEMU is still running after New")
	}
	if entries, _ := os.ReadDir(stateDir); len(entries) != 0 {
		t.Errorf("state dir still holds %v after New", entries)
	}
	if !alive(bystander.Process.Pid) {
		t.Errorf("New killed the QEMU of another state dir")
	}
}

// TestJobsTheGuestCannotServeAreRefusedBeforeBooting: the guest reaches
// only kiln's registry, through a loopback tunnel; anything else fails
// at once with a clear error instead of after a boot.
func TestJobsTheGuestCannotServeAreRefusedBeforeBooting(t *testing.T) {
	r := newRuntime(t)
	vol := testkit.Volume(t, 64<<20)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\n"})
	for name, tc := range map[string]struct {
		mutate func(*runtime.Job)
		want   string
	}{
		"registry by name":    {func(j *runtime.Job) { j.Solve.Push = []string{"kiln.example.com/app:1"} }, "registry_host"},
		"registry on the LAN": {func(j *runtime.Job) { j.InsecureRegistries = []string{"192.168.1.10:7070"} }, "loopback"},
		"tiny VM":             {func(j *runtime.Job) { j.MemoryMB = 64 }, "at least 256 MiB"},
		"bad network":         {func(j *runtime.Job) { j.Network = "bridge" }, "network"},
		"missing volume":      {func(j *runtime.Job) { j.Volume = "/nonexistent.ext4" }, "not a regular file"},
		"external registry on the LAN": {func(j *runtime.Job) {
			j.Registry = guestRegistry
			j.Solve.Push = append(j.Solve.Push, "10.0.0.5:5000/app:1")
		}, "by a host name"},
	} {
		t.Run(name, func(t *testing.T) {
			j := job("refused", vol, 512, solve.Request{ContextDir: dir, Push: []string{guestRegistry + "/app/x:1"}})
			tc.mutate(&j)
			start := time.Now()
			_, err := r.Run(context.Background(), j, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("refusal took %s: it booted a VM first", took)
			}
			assertReleased(t, r, vol)
		})
	}
}

// TestImageLargerThanVMMemory builds and pushes an image four times the
// VM's memory: layers must stream through the volume and the tunnel, never
// be held in guest RAM.
func TestImageLargerThanVMMemory(t *testing.T) {
	if os.Getenv("KILN_SLOW_TESTS") == "" {
		t.Skip("builds and pushes 2.1 GiB of random layers under TCG, several minutes: run with make test-slow (KILN_SLOW_TESTS=1)")
	}
	base := busyboxBase(t)
	r := newRuntime(t)
	vol := testkit.Volume(t, 8<<30)
	const memMB, layers, layerMB = 512, 3, 700
	var df strings.Builder
	df.WriteString("FROM " + base + "\n")
	for i := range layers {
		fmt.Fprintf(&df, "RUN dd if=/dev/urandom of=/blob%d bs=1M count=%d 2>&1 | tail -1\n", i, layerMB)
	}
	ref := guestRegistry + "/app/large:latest"
	rec := &testkit.Recorder{}
	j := job("large", vol, memMB, solve.Request{
		ContextDir: testkit.ContextDir(t, map[string]string{"Dockerfile": df.String()}),
		Push:       []string{ref},
	})
	// GC bounds as kiln sets them for this volume size (10% / 80%), so the
	// build is not followed by BuildKit pruning it back to the small
	// default test bounds.
	j.GC = runtime.GCPolicy{ReservedSpace: "800MB", MaxUsedSpace: "6400MB"}
	start := time.Now()
	res, err := r.Run(ctx(t, 30*time.Minute), j, rec)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("build after %s: %v", took, err)
	}
	size := pushedLayerBytes(t, onHost(ref))
	t.Logf("pushed %d MiB of layers from a %d MiB VM in %s (digest %s): %s", size>>20, memMB, took.Round(time.Second), res.Digest, breakdown(rec, took))
	for _, e := range rec.Events() {
		if e.Kind == progress.VertexCompleted && (strings.Contains(e.Name, "RUN") || strings.Contains(e.Name, "export")) {
			t.Logf("  done %s at +%s", e.Name, e.Time.Sub(start).Round(time.Second))
		}
	}
	if size < 4*memMB<<20 {
		t.Errorf("pushed image is %d MiB, want at least 4x the VM's %d MiB", size>>20, memMB)
	}
	assertReleased(t, r, vol)
}

// pushedLayerBytes sums the layer sizes of a pushed image's manifest
// without downloading the layers.
func pushedLayerBytes(t *testing.T, ref string) int64 {
	t.Helper()
	host, rest, _ := strings.Cut(ref, "/")
	repo, tag, _ := strings.Cut(rest, ":")
	req, _ := http.NewRequest(http.MethodGet, "http://"+host+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var m struct {
		Layers []struct {
			Size int64 `json:"size"`
		} `json:"layers"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &m) != nil {
		t.Fatalf("manifest of %s: %s %s", ref, resp.Status, bytes.TrimSpace(body))
	}
	var n int64
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}
