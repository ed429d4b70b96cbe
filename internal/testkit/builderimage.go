package testkit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/builderimage"
)

var (
	builderOnce sync.Once
	builder     builderimage.Manifest
	builderErr  error
)

// BuilderImage builds the builder VM image from this source tree, or
// reuses it when its inputs are unchanged. Every test binary of one tree
// shares the directory (the build takes a lock); two trees — a checkout
// and a CI clone on one machine — never share one, since their images
// differ.
func BuilderImage(t testing.TB) builderimage.Manifest {
	t.Helper()
	builderOnce.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			builderErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		builder, builderErr = builderimage.Build(ctx, builderimage.Options{
			OutputDir:       BuilderImageDir(),
			SourceDir:       root,
			InstallPackages: true,
		})
	})
	if builderErr != nil {
		t.Fatalf("build builder image: %v", builderErr)
	}
	return builder
}

// BuilderImageDir is the directory the tests of this source tree share
// for the builder image, keyed by the tree's path.
func BuilderImageDir() string {
	root, _ := RepoRoot()
	sum := sha256.Sum256([]byte(root))
	return filepath.Join(os.TempDir(), "kiln-test-builderimage-"+hex.EncodeToString(sum[:6]))
}
