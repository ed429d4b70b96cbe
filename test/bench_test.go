package test

import (
	"fmt"
	"testing"
	"time"

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
