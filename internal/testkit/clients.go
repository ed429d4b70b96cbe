package testkit

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// The registry clients the e2e tests drive kiln's registry with, built
// from the Go modules go.mod pins as tool directives (like versitygw), so
// nothing is downloaded outside the Go module proxy.
var (
	orasTool  = &goToolOnce{env: "KILN_ORAS", name: "oras", pkg: "oras.land/oras/cmd/oras"}
	craneTool = &goToolOnce{env: "KILN_CRANE", name: "crane", pkg: "github.com/google/go-containerregistry/cmd/crane"}
)

// Oras returns the path of an oras binary: $KILN_ORAS if set, else
// <repo>/bin/oras, built from the go.mod tool dependency when missing or
// older than go.mod.
func Oras(t testing.TB) string { t.Helper(); return orasTool.path(t) }

// Crane returns the path of a crane binary: $KILN_CRANE if set, else
// <repo>/bin/crane, built from the go.mod tool dependency when missing or
// older than go.mod.
func Crane(t testing.TB) string { t.Helper(); return craneTool.path(t) }

// goToolOnce finds or builds one Go program (goTool) once per test
// binary.
type goToolOnce struct {
	env, name, pkg string
	// stale says when an existing binary is rebuilt; nil: when it is
	// older than go.mod.
	stale func(bin, root string) bool
	// buildEnv is added to the build's environment.
	buildEnv []string

	once sync.Once
	bin  string
	err  error
}

func (g *goToolOnce) path(t testing.TB) string {
	t.Helper()
	g.once.Do(func() {
		stale := g.stale
		if stale == nil {
			stale = olderThanGoMod
		}
		g.bin, g.err = goTool(g.env, g.name, g.pkg, stale, g.buildEnv...)
	})
	if g.err != nil {
		t.Fatalf("%s binary: %v", g.name, g.err)
	}
	return g.bin
}

// olderThanGoMod reports whether bin predates go.mod, and so may be
// another version of the tool than the one pinned.
func olderThanGoMod(bin, root string) bool {
	fi, err := os.Stat(bin)
	mod, merr := os.Stat(filepath.Join(root, "go.mod"))
	return err != nil || merr != nil || fi.ModTime().Before(mod.ModTime())
}
