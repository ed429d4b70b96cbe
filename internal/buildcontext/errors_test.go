package buildcontext

import "testing"

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{
		500 << 20:  "500 MiB",
		1536 << 20: "1.5 GiB",
		2 << 30:    "2 GiB",
		32 << 10:   "32 KiB",
		900:        "900 bytes",
		1:          "1 byte",
	} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
