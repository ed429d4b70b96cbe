package builds

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/store"
)

// --platform is read as buildx reads it, normalized, checked against what
// the runtime can build, hashed in order, and handed to the solve; a
// FROM that differs per platform is pinned for each.
func TestPlatformsAreValidatedPinnedHashedAndSolved(t *testing.T) {
	f := newFixture(t, 2)
	f.rt.platforms = func(p []string) error {
		for _, q := range p {
			if q == "linux/s390x" {
				return errdefs.Invalid("this server cannot build linux/s390x")
			}
		}
		return nil
	}
	s, _ := f.service()
	ctx := context.Background()
	p := principal("plat")

	plain, err := submit(t, s, p, Request{})
	if err != nil {
		t.Fatal(err)
	}
	hashes := map[string]string{plain.InputHash: "none"}
	for _, c := range []struct {
		name   string
		in     []string
		stored []string
		same   string // the case whose hash this one shares
	}{
		{"the host's, explicitly", []string{"linux/amd64"}, []string{"linux/amd64"}, "none"},
		{"local", []string{"local"}, []string{"linux/amd64"}, "none"},
		{"two", []string{"linux/amd64,linux/arm64"}, []string{"linux/amd64", "linux/arm64"}, ""},
		{"two, repeated and spelled otherwise", []string{"linux/amd64", " linux/arm64/v8"}, []string{"linux/amd64", "linux/arm64"}, "two"},
		{"the other order", []string{"linux/arm64,linux/amd64"}, []string{"linux/arm64", "linux/amd64"}, ""},
		{"arch alone is linux's", []string{"arm64"}, []string{"linux/arm64"}, ""},
		{"arm defaults to v7", []string{"linux/arm"}, []string{"linux/arm/v7"}, ""},
	} {
		b, err := submit(t, s, p, Request{Platforms: c.in})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !slices.Equal(b.Options.Platforms, c.stored) {
			t.Errorf("%s: stored %v, want %v", c.name, b.Options.Platforms, c.stored)
		}
		got := hashes[b.InputHash]
		if got != c.same {
			t.Errorf("%s: input hash is that of %q, want %q", c.name, got, c.same)
		}
		if got == "" {
			hashes[b.InputHash] = c.name
		}
	}

	for _, bad := range []struct {
		in   []string
		says string
	}{
		{[]string{"windows/amd64"}, "Linux images only"},
		{[]string{"linux/amd64,linux/x86_64"}, "listed twice"},
		{[]string{"linux/s390x"}, "cannot build linux/s390x"},
		{[]string{"linux/not an arch!"}, "not a platform"},
		{[]string{"linux/amd64,linux/arm64,linux/arm/v6,linux/arm/v7,linux/riscv64", "linux/ppc64le,linux/386,linux/mips64le,linux/loong64"}, "more than the 8"},
	} {
		before := countBuilds(t, s)
		_, err := submit(t, s, p, Request{Platforms: bad.in})
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), bad.says) {
			t.Errorf("%v: %v, want invalid saying %q", bad.in, err, bad.says)
		}
		if after := countBuilds(t, s); after != before {
			t.Errorf("%v: a refused submission recorded a build", bad.in)
		}
	}

	// FROM base-${TARGETARCH} is a different image per platform: each is
	// pinned (and must exist) before the build is queued.
	df := "FROM kiln.test:5000/team-a/base-${TARGETARCH}:1\n"
	amd, err := pushImage(ctx, f.reg, "team-a/base-amd64", "1", "amd")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := submit(t, s, p, Request{Dockerfile: df, Platforms: []string{"linux/amd64,linux/arm64"}}); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "base-arm64") {
		t.Fatalf("a missing arm64 base: %v", err)
	}
	arm, err := pushImage(ctx, f.reg, "team-a/base-arm64", "1", "arm")
	if err != nil {
		t.Fatal(err)
	}
	b, err := submit(t, s, p, Request{Dockerfile: df, Platforms: []string{"linux/amd64,linux/arm64"}})
	if err != nil {
		t.Fatal(err)
	}
	var pinned []string
	for _, bp := range b.Options.Bases {
		pinned = append(pinned, bp.Digest)
	}
	if !slices.Equal(pinned, []string{amd, arm}) {
		t.Errorf("bases pinned %v, want amd64's %s and arm64's %s", pinned, amd, arm)
	}
	waitStatus(t, s, b.ID, store.StatusSucceeded)
	f.rt.mu.Lock()
	i := slices.IndexFunc(f.rt.jobs, func(j runtime.Job) bool { return j.BuildID == b.ID })
	job := f.rt.jobs[i]
	f.rt.mu.Unlock()
	if !slices.Equal(job.Solve.Platforms, []string{"linux/amd64", "linux/arm64"}) || len(job.Solve.NamedContexts) != 2 {
		t.Errorf("the solve got platforms %v and named contexts %v", job.Solve.Platforms, job.Solve.NamedContexts)
	}
}

func countBuilds(t *testing.T, s *Service) int {
	t.Helper()
	var n int
	if err := s.db.SQL.QueryRow("SELECT count(*) FROM builds").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
