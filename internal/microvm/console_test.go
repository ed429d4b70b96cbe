package microvm

import (
	"fmt"
	"strings"
	"testing"
)

// A panic's first line scrolls out behind its call trace; the report must
// still carry it, or the error says "the VM crashed" without saying why.
func TestConsoleReportKeepsTheKernelsComplaint(t *testing.T) {
	var b strings.Builder
	b.WriteString("[    0.1] booting\n[   36.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [buildkitd:212]\n")
	for i := range 50 {
		fmt.Fprintf(&b, "[   36.3] trace line %d\n", i)
	}
	got := consoleReport(b.String(), 10)
	if !strings.Contains(got, "soft lockup - CPU#0 stuck") {
		t.Errorf("report lost the kernel's complaint:\n%s", got)
	}
	if !strings.HasSuffix(got, "trace line 49") {
		t.Errorf("report lost the console's end:\n%s", got)
	}
	if strings.Contains(got, "booting") {
		t.Errorf("report carries lines before the complaint:\n%s", got)
	}
	if got := consoleReport("one\ntwo\nthree\n", 2); got != "two\nthree" {
		t.Errorf("quiet console: report = %q, want the last 2 lines", got)
	}
}
