package microvm

import (
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestProbeFallsBackToTCGWithAReason(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing")
	for _, c := range []struct {
		name, dev, pvm, reason string
	}{
		{"no /dev/kvm", missing, missing, "does not exist"},
		{"not a kvm device", "/dev/null", missing, "API version"},
		{"nested kvm_pvm", "/dev/null", dir, "kvm_pvm"},
	} {
		t.Run(c.name, func(t *testing.T) {
			accel, reason := probe(c.dev, c.pvm)
			if accel != AccelTCG || !strings.Contains(reason, c.reason) {
				t.Fatalf("probe = %s, %q; want tcg because of %q", accel, reason, c.reason)
			}
		})
	}
}

// TestHostTSCKHz compares the measured TSC frequency with the one the
// host kernel reports when it knows it exactly (tsc_known_freq).
func TestHostTSCKHz(t *testing.T) {
	khz := hostTSCKHz()
	if khz <= 0 {
		t.Fatal("could not measure the host TSC")
	}
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !strings.Contains(string(b), " tsc_known_freq") {
		t.Logf("measured %d kHz; host does not report a known TSC frequency to compare with", khz)
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil {
			t.Fatal(err)
		}
		if diff := math.Abs(float64(khz)-mhz*1000) / (mhz * 1000); diff > 0.005 {
			t.Fatalf("measured %d kHz, host says %.0f kHz (%.2f%% off)", khz, mhz*1000, diff*100)
		}
		t.Logf("measured %d kHz, host says %.0f kHz", khz, mhz*1000)
		return
	}
}
