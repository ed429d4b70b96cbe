package test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// BenchmarkBuildPaths measures, in one run against one server, a cold
// build (no_cache: fresh scratch volume), a warm rebuild of the same
// scope (only the last step reruns) and an identical resubmission
// (answered by dedup), and reports the ratios — the speed goals of kiln
// are these ratios, not absolute times.
func BenchmarkBuildPaths(b *testing.B) {
	s := startServer(b)
	base := s.base()
	df := fmt.Sprintf(`FROM %s
RUN for i in $(seq 1 200); do echo $i > /f$i; done
RUN sleep 1 && echo step-two > /two
ARG N
RUN echo $N > /n
`, base)
	var cold, warm, dedup time.Duration
	for i := 0; i < b.N; i++ {
		files := map[string]string{"Dockerfile": df}
		start := time.Now()
		mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: files,
			fields: [][2]string{{"no_cache", "true"}, {"build_args", fmt.Sprintf(`{"N":"cold-%d"}`, i)}}}))
		cold += time.Since(start)

		start = time.Now()
		mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: files,
			fields: [][2]string{{"build_args", fmt.Sprintf(`{"N":"warm-%d-%d"}`, i, time.Now().UnixNano())}}}))
		warm += time.Since(start)

		args := fmt.Sprintf(`{"N":"dedup-%d-%d"}`, i, time.Now().UnixNano())
		mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: files, fields: [][2]string{{"build_args", args}}}))
		start = time.Now()
		d := s.build(s.admin, submission{files: files, fields: [][2]string{{"build_args", args}}})
		dedup += time.Since(start)
		if d.DedupOf == nil {
			b.Fatalf("resubmission was not deduplicated")
		}
	}
	n := float64(b.N)
	b.ReportMetric(cold.Seconds()/n, "cold-s/op")
	b.ReportMetric(warm.Seconds()/n, "warm-s/op")
	b.ReportMetric(dedup.Seconds()/n*1000, "dedup-ms/op")
	b.ReportMetric(cold.Seconds()/warm.Seconds(), "cold/warm")
	b.ReportMetric(warm.Seconds()/dedup.Seconds(), "warm/dedup")
}

// BenchmarkWarmBuildVMOverProcess runs the same warm rebuild (one changed
// step on a warm scope) on a process-runtime server and on a vm-runtime
// server in one run, and reports the VM's cost as a ratio: what a build
// pays for its own kernel, boot and buildkitd start.
func BenchmarkWarmBuildVMOverProcess(b *testing.B) {
	builder := testkit.BuilderImage(b)
	servers := map[string]*server{
		"process": startServer(b),
		"vm":      startServer(b, withArgs("--runtime", "vm", "--builder-image", builder.Dir)),
	}
	took := map[string]time.Duration{}
	for name, s := range servers {
		df := fmt.Sprintf("FROM %s\nRUN for i in $(seq 1 200); do echo $i > /f$i; done\nARG N\nRUN echo $N > /n\n", s.base())
		warmup := s.build(s.admin, submission{files: map[string]string{"Dockerfile": df}, fields: [][2]string{{"build_args", `{"N":"warmup"}`}}})
		if got := mustSucceed(b, s, s.admin, warmup); got.Runtime != name {
			b.Fatalf("%s server ran the build on %q", name, got.Runtime)
		}
		for i := 0; i < b.N; i++ {
			start := time.Now()
			mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": df},
				fields: [][2]string{{"build_args", fmt.Sprintf(`{"N":"%d-%d"}`, i, time.Now().UnixNano())}}}))
			took[name] += time.Since(start)
		}
	}
	n := float64(b.N)
	b.ReportMetric(took["process"].Seconds()/n, "process-warm-s/op")
	b.ReportMetric(took["vm"].Seconds()/n, "vm-warm-s/op")
	b.ReportMetric(took["vm"].Seconds()/took["process"].Seconds(), "vm/process")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkWarmRebuildOverNativeBuildkitd is what a warm rebuild costs on
// kiln with its scope's builder kept up, over the same rebuild on a native
// buildkitd kept running with a persistent root (the best a local
// `buildctl` user gets), measured in one run: busybox, a 64 MiB layer and
// a cache-mount step, with only the last step changed. The goal
// is kiln/native ≤ 1.3.
func BenchmarkWarmRebuildOverNativeBuildkitd(b *testing.B) {
	s := startServer(b)
	base := s.base()
	df := fmt.Sprintf(`FROM %s
RUN head -c 67108864 /dev/urandom > /blob
RUN --mount=type=cache,target=/c echo x >> /c/runs
ARG N
RUN echo $N > /n
`, base)
	files := map[string]string{"Dockerfile": df}
	ctxDir := testkit.ContextDir(b, files)

	root, dir := b.TempDir(), b.TempDir()
	native, err := buildkitd.Start(context.Background(), buildkitd.Config{Binary: testkit.Buildkitd(b), Root: root, Dir: dir,
		InsecureRegistries: []string{s.addr}, NoHistory: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { native.Stop(context.Background()) })
	nativeBuild := func(n string) {
		_, err := solve.Run(context.Background(), native.Client(), solve.Request{ContextDir: ctxDir, DockerfileDir: ctxDir,
			BuildArgs: map[string]string{"N": n}, Push: []string{s.addr + "/native/bench:latest"},
			RegistryAuth: map[string]solve.Credentials{s.addr: {Username: "kiln", Password: s.admin}}}, nil)
		if err != nil {
			b.Fatalf("native build: %v", err)
		}
	}
	kilnBuild := func(n string) api.Build {
		return mustSucceed(b, s, s.admin, s.build(s.admin, submission{files: files,
			fields: [][2]string{{"build_args", fmt.Sprintf(`{"N":%q}`, n)}}}))
	}
	nativeBuild("warmup")
	kilnBuild("warmup")

	var nat, kiln time.Duration
	for i := 0; i < b.N; i++ {
		n := fmt.Sprintf("%d-%d", i, time.Now().UnixNano())
		start := time.Now()
		nativeBuild(n)
		nat += time.Since(start)
		start = time.Now()
		if got := kilnBuild(n); got.BuilderReused == nil || !*got.BuilderReused {
			b.Fatalf("kiln's warm rebuild did not reuse the scope's builder")
		}
		kiln += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(nat.Seconds()/n, "native-s/op")
	b.ReportMetric(kiln.Seconds()/n, "kiln-s/op")
	b.ReportMetric(kiln.Seconds()/nat.Seconds(), "kiln/native")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkIdenticalSubmissionsAtOnce sends five identical builds at once
// and counts the runtime runs they cost (kiln_runtime_runs_total): one,
// the others follow it and end with its digest.
func BenchmarkIdenticalSubmissionsAtOnce(b *testing.B) {
	// One tenant sends all five: let its uploads run at once.
	s := startServer(b, withArgs("--uploads-max-per-tenant", "8"))
	base := s.base()
	for i := 0; i < b.N; i++ {
		files := map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nARG N\nRUN sleep 1 && echo $N > /n\n", base)}
		args := fmt.Sprintf(`{"N":"%d-%d"}`, i, time.Now().UnixNano())
		before := runtimeRuns(b, s)
		ids := make(chan string, 5)
		var wg sync.WaitGroup
		for range 5 {
			wg.Go(func() {
				ids <- s.build(s.admin, submission{files: files, fields: [][2]string{{"build_args", args}}}).Id
			})
		}
		wg.Wait()
		close(ids)
		digests := map[string]bool{}
		for id := range ids {
			got := mustSucceed(b, s, s.admin, api.Build{Id: id})
			digests[*got.ImageDigest] = true
		}
		runs := runtimeRuns(b, s) - before
		if runs != 1 || len(digests) != 1 {
			b.Fatalf("5 identical submissions: %v runtime runs, %d digests; want 1 and 1", runs, len(digests))
		}
		b.ReportMetric(runs, "runtime-runs/5-submissions")
	}
	b.ReportMetric(0, "ns/op")
}

func runtimeRuns(b *testing.B, s *server) float64 {
	resp := s.do("", "GET", "/metrics", nil, "")
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "kiln_runtime_runs_total "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				b.Fatal(err)
			}
			return f
		}
	}
	b.Fatalf("no kiln_runtime_runs_total in /metrics")
	return 0
}

// BenchmarkContextRebuildOverNativeBuildkitd: a ~300 MiB context of 3,000
// files copied by the Dockerfile, rebuilt after one file changed, through
// `kiln build` against a server whose scope's builder is warm, over the
// same rebuild on a native buildkitd kept running (the local `buildctl`
// baseline), in one run. The goal is kiln/native ≤ 1.2.
func BenchmarkContextRebuildOverNativeBuildkitd(b *testing.B) {
	s := startServer(b)
	base := s.base()
	dir := b.TempDir()
	chunk := make([]byte, 100<<10)
	for i := range 3000 {
		rand.Read(chunk)
		sub := filepath.Join(dir, "src", fmt.Sprintf("d%02d", i%30))
		os.MkdirAll(sub, 0o755)
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%04d.bin", i)), chunk, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	df := fmt.Sprintf("FROM %s\nCOPY src /src\nRUN du -sh /src\n", base)
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644)
	touch := func(i int) {
		rand.Read(chunk)
		os.WriteFile(filepath.Join(dir, "src", "d00", "f0000.bin"), chunk, 0o644)
	}

	root, bkDir := b.TempDir(), b.TempDir()
	native, err := buildkitd.Start(context.Background(), buildkitd.Config{Binary: testkit.Buildkitd(b), Root: root, Dir: bkDir,
		InsecureRegistries: []string{s.addr}, NoHistory: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { native.Stop(context.Background()) })
	nativeBuild := func() {
		_, err := solve.Run(context.Background(), native.Client(), solve.Request{ContextDir: dir, DockerfileDir: dir,
			ContextKey: "bench", Push: []string{s.addr + "/native/ctx:latest"},
			RegistryAuth: map[string]solve.Credentials{s.addr: {Username: "kiln", Password: s.admin}}}, nil)
		if err != nil {
			b.Fatalf("native build: %v", err)
		}
	}
	var sentLine string
	kilnBuild := func() {
		out, err := exec.Command(kilnBinary(b), "build", "--addr", s.url(""), "--token", s.admin, "--progress", "plain", dir).CombinedOutput()
		if err != nil {
			b.Fatalf("kiln build: %v\n%s", err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "context: ") && strings.Contains(line, "; sent ") {
				sentLine = line
			}
		}
	}
	nativeBuild()
	kilnBuild()
	var nat, kiln time.Duration
	for i := 0; i < b.N; i++ {
		touch(i)
		start := time.Now()
		nativeBuild()
		nat += time.Since(start)
		touch(i)
		start = time.Now()
		kilnBuild()
		kiln += time.Since(start)
	}
	n := float64(b.N)
	b.ReportMetric(nat.Seconds()/n, "native-s/op")
	b.ReportMetric(kiln.Seconds()/n, "kiln-s/op")
	b.ReportMetric(kiln.Seconds()/nat.Seconds(), "kiln/native")
	b.ReportMetric(0, "ns/op")
	b.Logf("last rebuild: %s", strings.TrimSpace(sentLine))
}

// BenchmarkRegistryCacheImport measures what --cache-from buys a fresh
// cache scope: the same build in a new scope, once cold and once
// importing the registry cache another scope exported (--cache-to, kiln's
// registry, mode=max). The ratio imported/cold is the goal; the slow
// step (a second of work and a 32 MiB layer) is what the import skips.
func BenchmarkRegistryCacheImport(b *testing.B) {
	s := startServer(b)
	base := s.base()
	df := fmt.Sprintf("FROM %s\nRUN sleep 1 && head -c 33554432 /dev/urandom > /blob\nARG N\nRUN echo $N > /n\n", base)
	exporter := s.token("dev", "bench.exporter", "build:read", "build:write", "image:read")
	files := map[string]string{"Dockerfile": df}
	mustSucceed(b, s, exporter, s.build(exporter, submission{files: files,
		fields: [][2]string{{"cache_to", "type=registry,ref=bench-cache:main,mode=max"}, {"build_args", `{"N":"export"}`}}}))
	var cold, imported time.Duration
	for i := 0; i < b.N; i++ {
		arg := fmt.Sprintf(`{"N":"run-%d-%d"}`, i, time.Now().UnixNano())
		tok := s.token("dev", fmt.Sprintf("bench.cold%d", i), "build:read", "build:write", "image:read")
		start := time.Now()
		mustSucceed(b, s, tok, s.build(tok, submission{files: files, fields: [][2]string{{"build_args", arg}}}))
		cold += time.Since(start)

		tok = s.token("dev", fmt.Sprintf("bench.imported%d", i), "build:read", "build:write", "image:read")
		start = time.Now()
		got := mustSucceed(b, s, tok, s.build(tok, submission{files: files,
			fields: [][2]string{{"cache_from", "bench-cache:main"}, {"build_args", fmt.Sprintf(`{"N":"imported-%d-%d"}`, i, time.Now().UnixNano())}}}))
		imported += time.Since(start)
		if got.StepsCached == 0 {
			b.Fatalf("the build importing the registry cache had no cached step")
		}
	}
	n := float64(b.N)
	b.ReportMetric(cold.Seconds()/n, "cold-s/op")
	b.ReportMetric(imported.Seconds()/n, "imported-s/op")
	b.ReportMetric(imported.Seconds()/cold.Seconds(), "imported/cold")
}
