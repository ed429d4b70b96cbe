package test

import (
	"fmt"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// BenchmarkDedupAnswerPostgresOverSQLite measures, in one run, how long an
// identical resubmission takes from POST /v1/builds to its answer (202,
// succeeded, dedup_of the original: nothing runs) on a server whose records
// and queue are in SQLite (the default) and on one whose are in PostgreSQL
// (issue 10), and reports the ratio postgres/sqlite. Each server does one
// real build first; the resubmissions alternate between the servers so
// drift on the host weighs on both alike.
func BenchmarkDedupAnswerPostgresOverSQLite(b *testing.B) {
	names := []string{"sqlite", "postgres"}
	servers := map[string]*server{
		"sqlite":   startServer(b),
		"postgres": startServer(b, withArgs("--database", testkit.Postgres(b))),
	}
	subs := map[string]submission{}
	originals := map[string]string{}
	for _, name := range names {
		s := servers[name]
		df := fmt.Sprintf("FROM %s\nARG N\nRUN echo $N > /n\n", s.base())
		sub := submission{files: map[string]string{"Dockerfile": df},
			fields: [][2]string{{"build_args", fmt.Sprintf(`{"N":"dedup-%s-%d"}`, name, time.Now().UnixNano())}}}
		subs[name] = sub
		originals[name] = mustSucceed(b, s, s.admin, s.build(s.admin, sub)).Id
		// One untimed resubmission: what the first answer pays once
		// (connections, statement caches) is not the steady latency.
		if got := s.build(s.admin, sub); got.DedupOf == nil {
			b.Fatalf("%s: the warm-up resubmission was not deduplicated (status %s)", name, got.Status)
		}
	}
	took := map[string]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, name := range names {
			s := servers[name]
			start := time.Now()
			got := s.build(s.admin, subs[name])
			took[name] += time.Since(start)
			if got.Status != api.BuildStatusSucceeded || got.DedupOf == nil || *got.DedupOf != originals[name] {
				b.Fatalf("%s: identical resubmission: status %s, dedup_of %v; want succeeded from %s",
					name, got.Status, got.DedupOf, originals[name])
			}
		}
	}
	n := float64(b.N)
	b.ReportMetric(took["sqlite"].Seconds()/n*1000, "sqlite-dedup-ms/op")
	b.ReportMetric(took["postgres"].Seconds()/n*1000, "postgres-dedup-ms/op")
	b.ReportMetric(took["postgres"].Seconds()/took["sqlite"].Seconds(), "postgres/sqlite")
	b.ReportMetric(0, "ns/op")
}
