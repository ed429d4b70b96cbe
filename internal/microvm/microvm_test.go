package microvm_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/microvm"
	"github.com/kiln-build/kiln/internal/testkit"
)

// builderImage is the builder image the tests of this tree share.
func builderImage(t testing.TB) builderimage.Manifest {
	t.Helper()
	requireQEMU(t)
	return testkit.BuilderImage(t)
}

func requireQEMU(t testing.TB) {
	t.Helper()
	_, qerr := exec.LookPath("qemu-system-x86_64")
	_, kerr := os.Stat("/dev/kvm")
	if qerr != nil && kerr != nil {
		t.Skip("needs qemu-system-x86_64 (apt-get install -y qemu-system-x86); this host has neither QEMU nor /dev/kvm")
	}
	if qerr != nil {
		t.Fatalf("qemu-system-x86_64 is missing: %v; install it with `apt-get install -y qemu-system-x86`", qerr)
	}
}

func builderConfig(t testing.TB, m builderimage.Manifest, memMiB int) microvm.Config {
	return microvm.Config{
		Kernel:    m.KernelPath(),
		Initrd:    m.InitramfsPath(),
		Cmdline:   m.Cmdline,
		MemoryMiB: memMiB,
		CPUs:      2,
		Disks:     []microvm.Disk{{Path: m.RootfsPath(), Serial: m.RootSerial, ReadOnly: true}},
		Ports:     []string{m.AgentPort},
		RunDir:    t.TempDir(),
		Logger:    slog.New(slog.NewTextHandler(os.Stderr, nil)),
		Console:   consoleWriter(),
	}
}

// consoleWriter streams guest consoles to stderr, stamped with the time
// since the test binary started, when KILN_TEST_CONSOLE=1.
func consoleWriter() io.Writer {
	if os.Getenv("KILN_TEST_CONSOLE") != "1" {
		return nil
	}
	return &stampWriter{start: testStart}
}

var testStart = time.Now()

type stampWriter struct {
	mu    sync.Mutex
	start time.Time
	bol   bool
}

func (w *stampWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, line := range strings.SplitAfter(string(p), "\n") {
		if line == "" {
			continue
		}
		if !w.bol {
			fmt.Fprintf(os.Stderr, "[%7.3f] ", time.Since(w.start).Seconds())
		}
		os.Stderr.WriteString(line)
		w.bol = strings.HasSuffix(line, "\n") == false
	}
	return len(p), nil
}

// bootToReady starts a VM and reads the agent's hello, the first line
// kiln-agent writes on the virtio-serial port once the guest is up (see
// internal/guest), from the host end of the port.
func bootToReady(ctx context.Context, t testing.TB, cfg microvm.Config) (vm *microvm.VM, hi agentHello, took time.Duration) {
	t.Helper()
	start := time.Now()
	vm, err := microvm.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start VM: %v", err)
	}
	t.Cleanup(func() { vm.Kill() })
	port := vm.Port(builderimage.AgentPort)
	if port == nil {
		t.Fatal("VM has no agent port")
	}
	type res struct {
		line string
		err  error
	}
	ch := make(chan res, 1)
	go func() {
		l, err := bufio.NewReader(port).ReadString('\n')
		ch <- res{l, err}
	}()
	select {
	case r := <-ch:
		took = time.Since(start)
		if r.err != nil {
			vm.Kill()
			t.Fatalf("read agent port: %v\nconsole:\n%s", r.err, vm.Console())
		}
		if err := json.Unmarshal([]byte(r.line), &hi); err != nil || hi.Proto != "kiln-guest" {
			vm.Kill()
			t.Fatalf("agent's first line %q is not a kiln-guest hello (%v)\nconsole:\n%s", r.line, err, vm.Console())
		}
		return vm, hi, took
	case <-ctx.Done():
		vm.Kill()
		t.Fatalf("no agent hello before %v\nconsole:\n%s", ctx.Err(), vm.Console())
	}
	return nil, hi, 0
}

// agentHello is the first line of internal/guest's protocol.
type agentHello struct {
	Proto   string `json:"proto"`
	Version int    `json:"version"`
	Agent   string `json:"agent"`
}

// refuse answers the agent's hello with a refusal, as a host does that
// has no job for it; the agent then exits and the VM ends by itself.
func refuse(t testing.TB, vm *microvm.VM) {
	t.Helper()
	if _, err := fmt.Fprintf(vm.Port(builderimage.AgentPort), "{\"version\":%d,\"error\":\"boot test: no job\"}\n", guest.Version); err != nil {
		t.Fatalf("answer the agent's hello: %v", err)
	}
}

// kernelMemory reads what the guest kernel reports at boot: its version
// ("Linux version 6.1.0-…") and the memory it manages ("Memory:
// 1982140K/2096632K available"), the second number being all usable RAM.
var (
	kernelVersionRE = regexp.MustCompile(`Linux version (\S+)`)
	kernelMemoryRE  = regexp.MustCompile(`Memory: \d+K/(\d+)K available`)
)

// TestBootMatrix boots the builder image with every memory size a build
// may ask for and checks the real agent comes up, the guest sees that
// memory, and the VM ends by itself when the agent exits.
func TestBootMatrix(t *testing.T) {
	m := builderImage(t)
	accel, reason := microvm.ProbeAccel()
	t.Logf("accelerator %s: %s", accel, reason)
	for _, mem := range []int{256, 512, 1024, 2048, 4096, 8192} {
		t.Run(fmt.Sprintf("%dMiB", mem), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			vm, hi, took := bootToReady(ctx, t, builderConfig(t, m, mem))
			if hi.Version != guest.Version || !strings.HasPrefix(hi.Agent, "kiln-agent ") {
				t.Fatalf("agent hello %+v, want protocol version %d from kiln-agent", hi, guest.Version)
			}
			refuse(t, vm)
			// The agent exits on the refusal and init reboots: QEMU
			// must exit on its own, cleanly.
			select {
			case <-vm.Done():
			case <-time.After(30 * time.Second):
				t.Fatalf("QEMU still running 30s after the agent was refused\nconsole:\n%s", vm.Console())
			}
			if err := vm.Wait(); err != nil {
				t.Fatalf("QEMU exit: %v\nconsole:\n%s", err, vm.Console())
			}
			console := vm.Console()
			if !strings.Contains(console, "boot test: no job") {
				t.Errorf("console does not show the agent exiting on the refusal:\n%s", console)
			}
			if v := kernelVersionRE.FindStringSubmatch(console); v == nil || v[1] != m.KernelVersion {
				t.Errorf("guest kernel version %v, image has %s", v, m.KernelVersion)
			}
			mm := kernelMemoryRE.FindStringSubmatch(console)
			if mm == nil {
				t.Fatalf("no memory line on the console:\n%s", console)
			}
			kib, _ := strconv.Atoi(mm[1])
			seen := kib / 1024
			// The firmware and the kernel's reserved ranges take a
			// little; the rest must be visible, and never more than was
			// asked for.
			if seen > mem || seen < mem*95/100-16 {
				t.Errorf("guest sees %d MiB, asked for %d", seen, mem)
			}
			t.Logf("%5d MiB: boot to agent hello %s (guest kernel manages %d MiB, %s)", mem, took.Round(time.Millisecond), seen, vm.Accel())
		})
	}
}

// BenchmarkBootToAgentReady measures what every VM build pays before its
// agent can take the job: QEMU start, kernel boot, init, agent hello, for
// a 1 GiB builder. Under TCG (this machine) expect seconds; under KVM
// well under one.
func BenchmarkBootToAgentReady(b *testing.B) {
	m := builderImage(b)
	var total time.Duration
	for range b.N {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		vm, _, took := bootToReady(ctx, b, builderConfig(b, m, 1024))
		total += took
		refuse(b, vm)
		<-vm.Done()
		cancel()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "boot-to-agent-s/op")
	b.ReportMetric(0, "ns/op")
}

// TestKillLeavesNothing kills a booting VM and checks no QEMU process and
// no socket or run directory remain.
func TestKillLeavesNothing(t *testing.T) {
	m := builderImage(t)
	cfg := builderConfig(t, m, 512)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vm, err := microvm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	pid := vm.PID()
	if !processAlive(pid) {
		t.Fatal("QEMU is not running right after Start")
	}
	// Kill while the guest is still booting.
	time.Sleep(300 * time.Millisecond)
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	if processAlive(pid) {
		t.Fatalf("QEMU pid %d still exists after Kill", pid)
	}
	if pids := qemuProcessesUsing(t, cfg.RunDir); len(pids) > 0 {
		t.Fatalf("QEMU processes still running for this VM: %v", pids)
	}
	leftovers, _ := os.ReadDir(cfg.RunDir)
	if len(leftovers) > 0 {
		t.Fatalf("run directory still holds %v", leftovers)
	}
	if err := vm.Wait(); err == nil {
		t.Fatal("Wait after Kill returned nil, want the kill reported")
	}
	// Kill is idempotent.
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
}

// TestContextCancelStopsVM: canceling Start's context ends the VM.
func TestContextCancelStopsVM(t *testing.T) {
	m := builderImage(t)
	cfg := builderConfig(t, m, 256)
	ctx, cancel := context.WithCancel(context.Background())
	vm, err := microvm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-vm.Done():
	case <-time.After(10 * time.Second):
		vm.Kill()
		t.Fatal("VM still running 10s after its context was canceled")
	}
	if processAlive(vm.PID()) {
		t.Fatal("QEMU process survives cancel")
	}
}

// TestStopEndsVM: Stop asks QEMU to quit and returns once it is gone.
func TestStopEndsVM(t *testing.T) {
	m := builderImage(t)
	vm, err := microvm.Start(context.Background(), builderConfig(t, m, 256))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := vm.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if processAlive(vm.PID()) {
		t.Fatal("QEMU process survives Stop")
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("Stop took %s: QEMU ignored SIGTERM and was killed", took)
	}
}

// TestTwoVMsShareTheReadOnlyRoot boots two VMs from one root image at
// once, as concurrent builds do; a writable attachment would fail on
// QEMU's image lock.
func TestTwoVMsShareTheReadOnlyRoot(t *testing.T) {
	m := builderImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	hellos := make([]agentHello, 2)
	for i := range hellos {
		cfg := builderConfig(t, m, 256)
		// Each also gets its own writable disk, as builds get their
		// cache volume.
		cfg.Disks = append(cfg.Disks, microvm.Disk{Path: sparseDisk(t, 64<<20), Serial: builderimage.CacheSerial})
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, hellos[i], _ = bootToReady(ctx, t, cfg)
		}()
	}
	wg.Wait()
	for i, hi := range hellos {
		if hi.Proto != "kiln-guest" {
			t.Fatalf("VM %d said %+v", i, hi)
		}
	}
}

// TestWritableDiskIsExclusive: QEMU's image lock keeps a second VM from
// attaching a writable disk another VM is using, so a cache volume can
// never be written by two builds at once.
func TestWritableDiskIsExclusive(t *testing.T) {
	m := builderImage(t)
	disk := sparseDisk(t, 64<<20)
	first := builderConfig(t, m, 256)
	first.Disks = append(first.Disks, microvm.Disk{Path: disk, Serial: builderimage.CacheSerial})
	vm, err := microvm.Start(context.Background(), first)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	second := builderConfig(t, m, 256)
	second.Disks = append(second.Disks, microvm.Disk{Path: disk, Serial: builderimage.CacheSerial})
	vm2, err := microvm.Start(context.Background(), second)
	if err == nil {
		vm2.Kill()
		t.Fatal("second VM attached a writable disk the first VM holds")
	}
	if !strings.Contains(err.Error(), "lock") {
		t.Fatalf("error does not say the disk is locked: %v", err)
	}
	t.Logf("second VM refused: %v", err)
}

func sparseDisk(t *testing.T, size int64) string {
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestBrokenGuestEndsVM: without the root disk, init fails; the VM must
// end by itself (panic=-1, reboot=t, -no-reboot) with the reason on the
// console instead of hanging.
func TestBrokenGuestEndsVM(t *testing.T) {
	m := builderImage(t)
	cfg := builderConfig(t, m, 256)
	cfg.Disks = nil
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	vm, err := microvm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Done():
	case <-ctx.Done():
		vm.Kill()
		t.Fatalf("VM without a root disk did not end\nconsole:\n%s", vm.Console())
	}
	if !strings.Contains(vm.Console(), `no virtio disk with serial "kiln-root"`) {
		t.Fatalf("console does not say why the guest failed:\n%s", vm.Console())
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	m := builderImage(t)
	for name, mutate := range map[string]func(*microvm.Config){
		"tiny memory":   func(c *microvm.Config) { c.MemoryMiB = 16 },
		"missing disk":  func(c *microvm.Config) { c.Disks[0].Path = "/nonexistent" },
		"long serial":   func(c *microvm.Config) { c.Disks[0].Serial = strings.Repeat("x", 21) },
		"bad accel":     func(c *microvm.Config) { c.Accel = "hvf" },
		"missing qemu":  func(c *microvm.Config) { c.QEMU = "/nonexistent/qemu" },
		"dup port name": func(c *microvm.Config) { c.Ports = []string{"a", "a"} },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := builderConfig(t, m, 256)
			mutate(&cfg)
			vm, err := microvm.Start(context.Background(), cfg)
			if err == nil {
				vm.Kill()
				t.Fatal("Start accepted a bad config")
			}
		})
	}
}

// processAlive reports whether pid exists, zombies included: Kill must
// also reap.
func processAlive(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// qemuProcessesUsing lists processes whose command line mentions dir.
func qemuProcessesUsing(t *testing.T, dir string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), dir) && strings.Contains(string(b), "qemu") {
			pids = append(pids, pid)
		}
	}
	return pids
}
