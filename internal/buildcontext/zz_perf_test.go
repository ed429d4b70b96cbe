package buildcontext

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestZZHostilePerf(t *testing.T) {
	var es []ent
	deep := strings.Repeat("a/", 250)
	es = append(es, file(deep+"f", "x"))
	for i := 0; i < 2000; i++ {
		es = append(es, file(deep+"f"+strconv.Itoa(i), "x"))
	}
	// long targets walking down and up the deep tree
	tgt := strings.Repeat("a/", 250) + strings.Repeat("../", 250) + "a"
	for i := 0; i < 2000; i++ {
		es = append(es, symlink("s"+strconv.Itoa(i), tgt))
	}
	for i := 0; i < 2000; i++ {
		es = append(es, symlink("c"+strconv.Itoa(i), "s"+strconv.Itoa(i)+"/"+strings.Repeat("a/", 200)))
	}
	data := mkTar(t, es...)
	start := time.Now()
	_, info := mustReceive(t, data)
	t.Logf("%d entries, %d bytes in %v", info.Entries, len(data), time.Since(start))
}
