package testkit

import (
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/progress"
)

// WarmContext is the build both runtimes' warm-cache tests run twice on
// one cache volume, changing only the build arg BUST: the second build
// must answer the unchanged steps from the volume's cache, re-run the
// busted step, and find what the first build left in its cache mount.
func WarmContext(base string) map[string]string {
	return map[string]string{
		"hello.txt": "hello from the host\n",
		"Dockerfile": "FROM " + base + "\n" +
			"COPY hello.txt /hello.txt\n" +
			"RUN echo layer > /layer\n" +
			// Written once, in the first build; the step is cached afterwards.
			"RUN --mount=type=cache,target=/c test -f /c/stamp || (echo stamp-$RANDOM$RANDOM > /c/stamp)\n" +
			"ARG BUST\n" +
			// Re-runs whenever BUST changes and must see build 1's stamp.
			"RUN --mount=type=cache,target=/c echo \"bust=$BUST\" && cp /c/stamp /out\n",
	}
}

// CheckWarmRebuild asserts what WarmContext promises of the second build
// (its events in warm), given both builds' images.
func CheckWarmRebuild(t testing.TB, warm *Recorder, first, second Image) {
	t.Helper()
	if got := string(first.Files["/hello.txt"]); got != "hello from the host\n" {
		t.Errorf("/hello.txt = %q: the build context did not arrive intact", got)
	}
	if len(warm.Find(progress.VertexCached, "echo layer")) != 1 {
		t.Errorf("warm build did not answer `RUN echo layer` from the volume's cache")
	}
	if len(warm.Find(progress.VertexCompleted, "bust=")) != 1 {
		t.Errorf("warm build did not re-run the busted step")
	}
	stamp1, stamp2 := string(first.Files["/out"]), string(second.Files["/out"])
	if !strings.HasPrefix(stamp1, "stamp-") || stamp1 != stamp2 {
		t.Errorf("cache mount did not survive between builds on the volume: build1 /out=%q build2 /out=%q", stamp1, stamp2)
	}
}
