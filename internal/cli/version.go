package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/version"
)

// VersionCommand is `kiln version`, with the --addr and --token flags the
// other client commands have.
func VersionCommand() *cobra.Command { return newVersionCommand(defaultSettings) }

func newVersionCommand(s settings) *cobra.Command {
	g := &globals{settings: s}
	c := versionCommand(g)
	g.addFlags(c)
	c.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usageError(cmd, "%v", err) })
	return c
}

// versions is what kiln version prints; as JSON it is {"client": …,
// "server": …}, the server null when it could not be asked.
type versions struct {
	Client version.Info       `json:"client"`
	Server *api.ServerVersion `json:"server"`
	// Address is the server asked.
	Address string `json:"address"`
}

func versionCommand(g *globals) *cobra.Command {
	var format string
	c := &cobra.Command{
		Use:   "version",
		Short: "Show the versions of this client, the kiln server, and the BuildKit and builder image it builds with",
		Long: `Show the version of this client, then the server's: its version, the
BuildKit it runs builds with, its builder runtime and, for the vm runtime,
the digest of the builder VM image. The client part is printed even when
the server cannot be asked; the exit status is then 1.`,
		Example: `  kiln version
  kiln version --format '{{.server.buildkit}}'`,
		Args: exactArgs(),
	}
	c.Flags().StringVar(&format, "format", "", "json, or a Go template over the JSON object, such as '{{.server.version}}' (default: text)")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		out := listOutput{format: format}
		if format == "" {
			out.format = "table"
		}
		if err := out.check(cmd); err != nil {
			return err
		}
		v := versions{Client: version.Get()}
		cl, err := g.client(cmd)
		if err == nil {
			v.Address = cl.base
			v.Server, err = serverVersion(ctx, cl)
		}
		w := cmd.OutOrStdout()
		switch {
		case out.format == "json":
			if perr := printJSON(w, v); perr != nil {
				return perr
			}
		case out.tmpl != nil:
			if v.Server == nil {
				// A template reaching into .server would fail on null;
				// the error below is what matters.
				break
			}
			if terr := execTemplate(w, out.tmpl, v); terr != nil {
				return terr
			}
		default:
			printVersions(w, v)
		}
		return err
	})
	return c
}

func serverVersion(ctx context.Context, cl *client) (*api.ServerVersion, error) {
	r, err := cl.api.GetVersionWithResponse(ctx)
	if err != nil {
		return nil, cl.transportError(ctx, "version of the server", err)
	}
	if err := cl.check(r.HTTPResponse, r.Body); err != nil {
		return nil, fmt.Errorf("version of the server at %s: %w", cl.base, err)
	}
	if r.JSON200 == nil {
		return nil, fmt.Errorf("version of the server at %s: it answered %d without one (a kiln older than GET /v1/version?)", cl.base, r.StatusCode())
	}
	return r.JSON200, nil
}

// printVersions prints the versions as docker version does: a Client
// section, then a Server section when the server answered.
func printVersions(w io.Writer, v versions) {
	tw := newTable(w)
	row := func(k, val string) {
		if val != "" {
			fmt.Fprintf(tw, " %s:\t%s\n", k, val)
		}
	}
	fmt.Fprintln(tw, "Client:")
	row("Version", v.Client.Version)
	row("Commit", v.Client.Commit)
	row("Go version", v.Client.GoVersion)
	row("OS/Arch", v.Client.OS+"/"+v.Client.Arch)
	if s := v.Server; s != nil {
		fmt.Fprintln(tw, "")
		fmt.Fprintf(tw, "Server: %s\n", v.Address)
		row("Version", s.Version)
		row("Commit", str(s.Commit))
		row("Go version", s.GoVersion)
		row("OS/Arch", s.Os+"/"+s.Arch)
		row("BuildKit", s.Buildkit)
		row("Runtime", s.Runtime)
		row("Builder image", str(s.BuilderImage))
	}
	tw.Flush()
}
