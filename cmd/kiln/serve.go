package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/daemon"
)

func serveCommand() *cobra.Command {
	var cfg config.Config
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the kiln build service (API, registry, queue, builders)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cfg.Load(cmd.Flags()); err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return daemon.Serve(ctx, cfg)
		},
	}
	cfg.Bind(cmd.Flags())
	return cmd
}
