package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
)

// Dynamic shell completion: build ids and image names come from the
// server, context names from the config file. A completion must never
// hang the shell nor print errors into its candidates: the server is
// asked with a short timeout (settings.completionTimeout), and any
// failure (no server, no token, a broken config) completes nothing.

// installCompletions attaches the completion functions to the commands
// that take build ids or image names.
func installCompletions(g *globals, cmds []*cobra.Command) {
	builds, images := completeBuildIDs(g), completeImageNames(g)
	for _, c := range cmds {
		switch c.Name() {
		case "builds":
			for _, name := range []string{"show", "logs", "cancel"} {
				if sub := subcommand(c, name); sub != nil {
					sub.ValidArgsFunction = firstArg(builds)
				}
			}
		case "images":
			for _, name := range []string{"rm", "tag", "show"} {
				if sub := subcommand(c, name); sub != nil {
					sub.ValidArgsFunction = firstArg(images)
				}
			}
		case "run":
			c.ValidArgsFunction = firstArg(images)
		}
	}
}

func subcommand(c *cobra.Command, name string) *cobra.Command {
	for _, s := range c.Commands() {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

// firstArg completes only the first positional argument.
func firstArg(f cobra.CompletionFunc) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return f(cmd, args, toComplete)
	}
}

// completionClient is the API client for a completion, with a context
// bounded by the completion timeout; nil when there is none to be had.
func (g *globals) completionClient(cmd *cobra.Command) (*client, context.Context, context.CancelFunc) {
	cl, err := g.client(cmd)
	if err != nil {
		return nil, nil, nil
	}
	base := cmd.Context()
	if base == nil {
		base = context.Background()
	}
	d := g.completionTimeout
	if d <= 0 {
		d = defaultSettings.completionTimeout
	}
	ctx, cancel := context.WithTimeout(base, d)
	return cl, ctx, cancel
}

func completeBuildIDs(g *globals) cobra.CompletionFunc {
	return func(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		const none = cobra.ShellCompDirectiveNoFileComp
		cl, ctx, cancel := g.completionClient(cmd)
		if cl == nil {
			return nil, none
		}
		defer cancel()
		limit := 50
		params := &api.ListBuildsParams{Limit: &limit}
		if toComplete != "" {
			params.IdPrefix = &toComplete
		}
		r, err := cl.api.ListBuildsWithResponse(ctx, params)
		if err != nil || r.JSON200 == nil {
			return nil, none
		}
		now := time.Now()
		var out []cobra.Completion
		for _, b := range r.JSON200.Builds {
			if !strings.HasPrefix(b.Id, toComplete) {
				continue
			}
			desc := fmt.Sprintf("%s, %s ago", b.Status, humanAge(now, b.CreatedAt))
			if len(b.Tags) > 0 {
				desc += ", " + strings.Join(b.Tags, " ")
			}
			out = append(out, cobra.CompletionWithDesc(b.Id, desc))
		}
		return out, none
	}
}

func completeImageNames(g *globals) cobra.CompletionFunc {
	return func(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		const none = cobra.ShellCompDirectiveNoFileComp
		cl, ctx, cancel := g.completionClient(cmd)
		if cl == nil {
			return nil, none
		}
		defer cancel()
		// The per-build names builds/<id>:latest only once asked for.
		params := &api.ListImagesParams{}
		if !strings.HasPrefix(toComplete, "builds/") {
			no := false
			params.IncludeBuilds = &no
		}
		r, err := cl.api.ListImagesWithResponse(ctx, params)
		if err != nil || r.JSON200 == nil {
			return nil, none
		}
		var out []cobra.Completion
		for _, im := range r.JSON200.Images {
			if !strings.HasPrefix(im.Name, toComplete) {
				continue
			}
			desc := shortDigest(im.Digest)
			if im.Size != nil && *im.Size > 0 {
				desc += ", " + humanSize(*im.Size)
			}
			out = append(out, cobra.CompletionWithDesc(im.Name, desc))
		}
		return out, none
	}
}

// completeContexts completes context names from the config file;
// withDefault adds the built-in "default".
func completeContexts(withDefault bool) cobra.CompletionFunc {
	return func(_ *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		const none = cobra.ShellCompDirectiveNoFileComp
		cfg, _, err := loadConfig()
		if err != nil {
			return nil, none
		}
		var out []cobra.Completion
		if withDefault && strings.HasPrefix(defaultContext, toComplete) {
			out = append(out, cobra.CompletionWithDesc(defaultContext, defaultAddr))
		}
		for _, e := range cfg.Contexts {
			if strings.HasPrefix(e.Name, toComplete) {
				out = append(out, cobra.CompletionWithDesc(e.Name, e.Address))
			}
		}
		return out, none
	}
}
