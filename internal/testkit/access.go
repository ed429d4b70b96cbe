package testkit

import (
	"context"
	"fmt"
	"testing"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/errdefs"
)

// Policy is kiln's access policy as a server with default settings has
// it (base/ shared), for a registry without builds.
func Policy(t testing.TB) *access.Policy {
	t.Helper()
	p, err := access.New(access.Config{Shared: []string{"base"}}, access.OwnersFunc(func(_ context.Context, id string) (string, bool, error) {
		return "", false, fmt.Errorf("build %s: %w", id, errdefs.ErrNotFound)
	}))
	if err != nil {
		t.Fatal(err)
	}
	return p
}
