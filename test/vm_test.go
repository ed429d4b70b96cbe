package test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// With the default --runtime auto and a builder image, builds run in
// microVMs: the daemon wires the vm runtime up, a build's steps run on the
// builder's kernel with the memory the build asked for, and the build
// says which runtime ran it. The builder-image commands find, keep and
// show the image the daemon boots.
func TestAutoRuntimeBuildsInAVMWhenABuilderImageExists(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	builder := testkit.BuilderImage(t)

	// Building over an up-to-date image keeps it: same digest, and show
	// verifies the files against the manifest.
	out, err := exec.Command(kilnBinary(t), "builder-image", "build", "--builder-image", builder.Dir, "--json").Output()
	if err != nil {
		t.Fatalf("kiln builder-image build over an up-to-date image: %v\n%s", err, out)
	}
	var m struct{ Digest string }
	if err := json.Unmarshal(out, &m); err != nil || m.Digest != builder.Digest {
		t.Errorf("kiln builder-image build answered digest %q (%v), want the existing %s", m.Digest, err, builder.Digest)
	}
	out, err = exec.Command(kilnBinary(t), "builder-image", "show", "--verify", "--builder-image", builder.Dir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), builder.Digest) || !strings.Contains(string(out), builder.KernelVersion) {
		t.Errorf("kiln builder-image show --verify: %v\n%s", err, out)
	}
	out, err = exec.Command(kilnBinary(t), "builder-image", "show", "--builder-image", t.TempDir()).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "builder-image build") {
		t.Errorf("show without an image should fail and say how to make one: %v\n%s", err, out)
	}

	s := startServer(t, withArgs("--runtime", "auto", "--builder-image", builder.Dir))
	if logs := s.logs(); !strings.Contains(logs, "builder runtime: vm") || !strings.Contains(logs, "accelerator=") {
		t.Fatalf("kiln serve did not say it uses the vm runtime and which accelerator:\n%s", logs)
	}
	base := s.base()
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{
		files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\n"+
			"RUN echo \"kernel=$(uname -r) mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)\"\n", base)},
		fields: [][2]string{{"memory_mb", "512"}, {"tags", "vm/app:1"}},
	}))
	if b.Runtime != "vm" || b.MemoryMb == nil || *b.MemoryMb != 512 {
		t.Errorf("build shows runtime %q, memory %v; want vm with 512 MiB", b.Runtime, b.MemoryMb)
	}
	logs := s.logText(s.admin, b.Id)
	printed := "kernel=" + builder.KernelVersion + " mem="
	i := strings.Index(logs, printed)
	if i < 0 {
		t.Fatalf("the step did not run on the builder's kernel %s:\n%s", builder.KernelVersion, logs)
	}
	var mem int
	fmt.Sscanf(logs[i+len(printed):], "%d", &mem)
	if mem < 300 || mem > 512 {
		t.Errorf("the step saw %d MiB of memory; the build asked for a 512 MiB VM", mem)
	}

	// The scope's next build of the same shape runs on the same VM: no
	// boot, no buildkitd start, and the build says so.
	again := mustSucceed(t, s, s.admin, s.build(s.admin, submission{
		files:  map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo again-on-the-same-vm\n", base)},
		fields: [][2]string{{"memory_mb", "512"}},
	}))
	againLog := s.logText(s.admin, again.Id)
	if again.BuilderReused == nil || !*again.BuilderReused {
		t.Errorf("the scope's second VM build did not reuse its builder:\n%s", againLog)
	}
	if strings.Contains(againLog, "builder VM booted") || strings.Contains(againLog, "starting buildkitd") {
		t.Errorf("the reused VM build booted or started buildkitd:\n%s", againLog)
	}
	if first, second := (*b.Timings)["builder_start"], (*again.Timings)["builder_start"]; second >= first {
		t.Errorf("builder_start %.2fs on the reused VM, %.2fs on a fresh one", second, first)
	}

	// The builder reaches kiln only as a registry: its tunnel to kiln's
	// address serves /v2/ alone, so BuildKit fetching kiln's health (or
	// API, or metrics) endpoint through it gets 404.
	probe := s.build(s.admin, submission{files: map[string]string{"Dockerfile": "FROM scratch\nADD http://" + s.addr + "/healthz /h\n"}})
	probe = s.wait(s.admin, probe.Id, 5*time.Minute)
	if probe.Status != api.BuildStatusFailed || probe.Error == nil || !strings.Contains(*probe.Error+s.logText(s.admin, probe.Id), "404") {
		t.Errorf("a VM build fetched kiln's /healthz through its registry tunnel: %s %v\n%s", probe.Status, probe.Error, s.logText(s.admin, probe.Id))
	}
}

// Without a builder image, auto runs builds on the process runtime and
// says why.
func TestAutoRuntimeFallsBackToProcessWithoutABuilderImage(t *testing.T) {
	s := startServer(t, withArgs("--runtime", "auto", "--builder-image", t.TempDir()))
	logs := s.logs()
	if !strings.Contains(logs, "auto falls back to process") || !strings.Contains(logs, "builder image") {
		t.Errorf("kiln serve did not say why auto fell back to process:\n%s", logs)
	}
	if !strings.Contains(logs, "builder runtime: process") {
		t.Errorf("kiln serve did not say it uses the process runtime:\n%s", logs)
	}
}
