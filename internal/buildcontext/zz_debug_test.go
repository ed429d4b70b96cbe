package buildcontext

import (
	"bytes"
	"context"
	"math/rand"
	"path/filepath"
	"testing"
	"time"
)

func TestZZMutations(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	seeds := fuzzSeeds(t)
	var names []string
	for n := range seeds { names = append(names, n) }
	for i := 0; i < 3000; i++ {
		name := names[rng.Intn(len(names))]
		d := bytes.Clone(seeds[name])
		for k := rng.Intn(4) + 1; k > 0; k-- {
			if len(d) == 0 { break }
			switch rng.Intn(3) {
			case 0: d[rng.Intn(len(d))] = byte(rng.Intn(256))
			case 1: d = d[:rng.Intn(len(d))]
			case 2: p := rng.Intn(len(d)); d[p] ^= 1 << rng.Intn(8)
			}
		}
		dst := filepath.Join(t.TempDir(), "ctx")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		start := time.Now()
		_, err := Receive(ctx, bytes.NewReader(d), dst, Limits{MaxBytes: 1 << 20, MaxUncompressedBytes: 8 << 20, MaxEntries: 2000})
		cancel()
		if el := time.Since(start); el > 500*time.Millisecond {
			t.Logf("slow %v on %s: %v", el, name, err)
		}
		if e, ok := err.(*Error); ok && e.Status != 400 && e.Status != 413 {
			t.Logf("status %d on %s: %s", e.Status, name, e.Msg)
		}
	}
}
