package builds

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kiln-build/kiln/internal/builders"
	"github.com/kiln-build/kiln/internal/store"
)

// metrics exports build counters for Prometheus. Counts by status and
// volume bytes are read at scrape time from their sources of truth, so
// they survive restarts and never drift.
type metrics struct {
	s           *Service
	submittedC  prometheus.Counter
	finishedC   *prometheus.CounterVec
	duration    prometheus.Histogram
	cachedRatio prometheus.Histogram
	dedupHits   prometheus.Counter
	runs        prometheus.Counter
	phases      *prometheus.HistogramVec
	reused      prometheus.Counter

	byStatus *prometheus.Desc
	queueLen *prometheus.Desc
	volBytes *prometheus.Desc
	volUsed  *prometheus.Desc
	volCount *prometheus.Desc
	warm     *prometheus.Desc
	ctxBytes *prometheus.Desc
}

func newMetrics(s *Service) *metrics {
	return &metrics{
		s: s,
		submittedC: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_builds_submitted_total", Help: "Builds accepted since the server started.",
		}),
		finishedC: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiln_builds_finished_total", Help: "Builds that reached a terminal status since the server started.",
		}, []string{"status"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "kiln_build_duration_seconds", Help: "Running time of builds (excluding time queued).",
			Buckets: prometheus.ExponentialBuckets(0.5, 2, 14),
		}),
		cachedRatio: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "kiln_build_cached_step_ratio", Help: "Share of a succeeded build's steps answered from cache.",
			Buckets: []float64{0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1},
		}),
		dedupHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_dedup_hits_total", Help: "Builds answered from an identical earlier build without running anything.",
		}),
		runs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_runtime_runs_total", Help: "Builds handed to a builder runtime (BuildKit solves started).",
		}),
		phases: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kiln_build_phase_seconds", Help: "Time builds spent per phase (queued, builder_start, context_transfer, solve, export, push).",
			Buckets: prometheus.ExponentialBuckets(0.01, 3, 12),
		}, []string{"phase", "runtime"}),
		reused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiln_builder_reuses_total", Help: "Builds that ran on a builder kept up from an earlier build of their scope.",
		}),
		ctxBytes: prometheus.NewDesc("kiln_context_store_bytes", "Bytes of build context content kept for manifest uploads, all tenants.", nil, nil),
		warm:     prometheus.NewDesc("kiln_builders_warm", "Builders kept up between builds, by state (idle, building).", []string{"state"}, nil),
		byStatus: prometheus.NewDesc("kiln_builds", "Builds recorded, by status.", []string{"status"}, nil),
		queueLen: prometheus.NewDesc("kiln_queue_length", "Builds waiting to run.", nil, nil),
		// Totals only: /metrics answers without a token, and a scope
		// names its tenant (kiln cache ls shows each scope to those who
		// may see it).
		volBytes: prometheus.NewDesc("kiln_cache_volumes_allocated_bytes", "Host bytes allocated by all cache volumes.", nil, nil),
		volUsed:  prometheus.NewDesc("kiln_cache_volumes_used_bytes", "Bytes used inside all cache volumes.", nil, nil),
		volCount: prometheus.NewDesc("kiln_cache_volumes", "Cache volumes on this host.", nil, nil),
	}
}

// Collector returns the service's Prometheus collector.
func (s *Service) Collector() prometheus.Collector { return s.metrics }

func (m *metrics) submitted() { m.submittedC.Inc() }

func (m *metrics) dedupHit() { m.dedupHits.Inc() }

func (m *metrics) runtimeRun() { m.runs.Inc() }

func (m *metrics) finished(_ string, o store.Outcome) { m.finishedC.WithLabelValues(o.Status).Inc() }

func (m *metrics) observeDuration(d time.Duration) { m.duration.Observe(d.Seconds()) }

func (m *metrics) observePhases(runtime string, o store.Outcome) {
	for phase, secs := range o.Timings {
		m.phases.WithLabelValues(phase, runtime).Observe(secs)
	}
	if o.BuilderReused {
		m.reused.Inc()
	}
}

func (m *metrics) observeSteps(total, cached int) {
	if total > 0 {
		m.cachedRatio.Observe(float64(cached) / float64(total))
	}
}

func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.submittedC.Describe(ch)
	m.finishedC.Describe(ch)
	m.duration.Describe(ch)
	m.cachedRatio.Describe(ch)
	m.dedupHits.Describe(ch)
	m.runs.Describe(ch)
	m.phases.Describe(ch)
	m.reused.Describe(ch)
	ch <- m.warm
	ch <- m.ctxBytes
	ch <- m.byStatus
	ch <- m.queueLen
	ch <- m.volBytes
	ch <- m.volUsed
	ch <- m.volCount
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.submittedC.Collect(ch)
	m.finishedC.Collect(ch)
	m.duration.Collect(ch)
	m.cachedRatio.Collect(ch)
	m.dedupHits.Collect(ch)
	m.runs.Collect(ch)
	m.phases.Collect(ch)
	m.reused.Collect(ch)
	counts := map[string]int{builders.StateIdle: 0, builders.StateBuilding: 0}
	for _, b := range m.s.builders.List() {
		counts[b.State]++
	}
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(m.warm, prometheus.GaugeValue, float64(n), state)
	}
	if m.s.contexts != nil {
		ch <- prometheus.MustNewConstMetric(m.ctxBytes, prometheus.GaugeValue, float64(m.s.contexts.TotalBytes()))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if counts, err := store.CountByStatus(ctx, m.s.db.SQL); err == nil {
		for _, st := range []string{store.StatusQueued, store.StatusRunning, store.StatusSucceeded, store.StatusFailed, store.StatusCanceled} {
			ch <- prometheus.MustNewConstMetric(m.byStatus, prometheus.GaugeValue, float64(counts[st]), st)
		}
		ch <- prometheus.MustNewConstMetric(m.queueLen, prometheus.GaugeValue, float64(counts[store.StatusQueued]))
	}
	if vols, err := m.s.volumes.List(); err == nil {
		var allocated, used int64
		for _, v := range vols {
			allocated += v.AllocatedBytes
			used += v.UsedBytes
		}
		ch <- prometheus.MustNewConstMetric(m.volBytes, prometheus.GaugeValue, float64(allocated))
		ch <- prometheus.MustNewConstMetric(m.volUsed, prometheus.GaugeValue, float64(used))
		ch <- prometheus.MustNewConstMetric(m.volCount, prometheus.GaugeValue, float64(len(vols)))
	}
}
