// Command kiln is the one binary of kiln: `kiln serve` runs the build
// service; every other subcommand is a client of its REST API.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/internal/cli"
)

func main() {
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "kiln builds container images in disposable builders with a warm per-scope cache",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCommand())
	root.AddCommand(migrateDBCommand())
	root.AddCommand(builderImageCommand())
	root.AddCommand(cli.Commands()...)
	root.AddCommand(cli.VersionCommand())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kiln:", err)
		os.Exit(cli.ExitCode(err))
	}
}
