package process

import (
	"context"

	"github.com/kiln-build/kiln/internal/buildkitd"
)

// The buildkitd starter moved to internal/buildkitd so the guest agent
// shares it. These names stay for existing callers (solve and mirror tests);
// new code uses package buildkitd directly.
type (
	// DaemonConfig is buildkitd.Config.
	DaemonConfig = buildkitd.Config
	// Daemon is buildkitd.Daemon.
	Daemon = buildkitd.Daemon
)

// StartBuildkitd is buildkitd.Start.
func StartBuildkitd(ctx context.Context, cfg DaemonConfig) (*Daemon, error) {
	return buildkitd.Start(ctx, cfg)
}
