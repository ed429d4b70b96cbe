package microvm

import (
	"sort"
	"sync"
	"time"
)

var (
	tscOnce sync.Once
	tscKHz  int64
)

// hostTSCKHz measures the host's TSC frequency. Under TCG the guest's
// TSC is the host's TSC, and the guest kernel cannot calibrate it itself
// on a busy host: its PIT calibration fails, the TSC is marked unstable
// and the boot hangs waiting for timer ticks. Handing it the frequency
// (tsc_early_khz) avoids that. Returns 0 when it cannot be measured.
func hostTSCKHz() int64 {
	tscOnce.Do(func() {
		if !haveTSC {
			return
		}
		var samples []int64
		for i := 0; i < 5 && len(samples) < 3; i++ {
			if s, ok := sampleTSC(20 * time.Millisecond); ok {
				samples = append(samples, s)
			}
		}
		if len(samples) == 0 {
			return
		}
		sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
		tscKHz = samples[len(samples)/2]
	})
	return tscKHz
}

// sampleTSC counts TSC ticks across d of monotonic time. Each end is
// bracketed by two clock reads; a sample taken while the thread was
// preempted between them is discarded.
func sampleTSC(d time.Duration) (int64, bool) {
	read := func() (time.Time, uint64, bool) {
		a := time.Now()
		c := rdtsc()
		b := time.Now()
		return a.Add(b.Sub(a) / 2), c, b.Sub(a) < 20*time.Microsecond
	}
	t0, c0, ok0 := read()
	time.Sleep(d)
	t1, c1, ok1 := read()
	el := t1.Sub(t0)
	if !ok0 || !ok1 || el <= 0 || c1 <= c0 {
		return 0, false
	}
	return int64(float64(c1-c0) / (float64(el) / float64(time.Millisecond))), true
}
