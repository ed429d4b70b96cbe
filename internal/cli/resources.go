package cli

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
)

func imagesCommand(g *globals) *cobra.Command {
	var all bool
	var out listOutput
	ls := &cobra.Command{
		Use:     "ls [FILTER]",
		Aliases: []string{"list"},
		Short:   "List image names with their digests and sizes",
		Long: `List the image names you may pull, by name, with their digest and
compressed size (config and layers).

Every build also names its result builds/<id>:latest; those names are
left out unless --all. FILTER keeps the names starting with it (team-a/,
app:1) or matching it as a glob (team-a/*, 'app:v1.*'; a glob without a
':' is matched against the repository). A name you would give without your
namespace (app) matches as you give it.`,
		Example: `  kiln images ls
  kiln images ls 'team-a/*'
  kiln images ls -q app
  kiln images ls --format '{{.name}} {{size .size}}'`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError(cmd, "%q takes at most one FILTER; got %d arguments", cmd.CommandPath(), len(args))
			}
			return nil
		},
	}
	ls.Flags().BoolVarP(&all, "all", "a", false, "list every name, the per-build names builds/<id>:latest included")
	addListOutputFlags(ls, &out, "names")
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		if err := out.check(cmd); err != nil {
			return err
		}
		var params api.ListImagesParams
		if !all {
			no := false
			params.IncludeBuilds = &no
		}
		if len(args) == 1 && args[0] != "" {
			params.Filter = &args[0]
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.ListImagesWithResponse(ctx, &params)
		if err != nil {
			return cl.transportError(ctx, "list images", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("list images: server answered %d without an image list", r.StatusCode())
		}
		return printRows(cmd.OutOrStdout(), &out, r.JSON200.Images, func(im api.Image) string { return im.Name }, printImages)
	})

	tag := &cobra.Command{
		Use:   "tag SOURCE NEW",
		Short: "Give an image another name (same digest, nothing is rebuilt or copied)",
		Args:  exactArgs("SOURCE", "NEW"),
	}
	tag.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.TagImageWithResponse(ctx, args[0], api.TagRequest{Name: args[1]})
		if err != nil {
			return cl.transportError(ctx, "tag image "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON201 == nil {
			return fmt.Errorf("tag image %s: server answered %d without the new image", args[0], r.StatusCode())
		}
		im := r.JSON201
		fmt.Fprintf(cmd.OutOrStdout(), "%s -> %s\n", im.Name, im.Digest)
		return nil
	})

	rm := &cobra.Command{
		Use:     "rm NAME",
		Aliases: []string{"remove"},
		Short:   "Remove an image name; the image stays while other names refer to it",
		Args:    exactArgs("NAME"),
	}
	rm.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.DeleteImageWithResponse(ctx, args[0])
		if err != nil {
			return cl.transportError(ctx, "remove image "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", args[0])
		return nil
	})

	return groupCommand("images", "List, show, tag and remove images in kiln's registry", ls, imageShowCommand(g), tag, rm)
}

// printImages is the table of images ls.
func printImages(w io.Writer, list []api.Image) error {
	now := time.Now()
	tw := newTable(w)
	fmt.Fprintln(tw, "NAME\tDIGEST\tSIZE\tBUILD\tCREATED")
	for _, im := range list {
		created, size := "-", "-"
		if im.CreatedAt != nil {
			created = humanAge(now, *im.CreatedAt)
		}
		if im.Size != nil && *im.Size > 0 {
			size = humanSize(*im.Size)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", im.Name, shortDigest(im.Digest), size, orDash(str(im.BuildId)), created)
	}
	return tw.Flush()
}

func cacheCommand(g *globals) *cobra.Command {
	var out listOutput
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List cache volumes, one per cache scope",
		Args:    exactArgs(),
	}
	addListOutputFlags(ls, &out, "scopes")
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		if err := out.check(cmd); err != nil {
			return err
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.ListCacheWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "list cache volumes", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("list cache volumes: server answered %d without a volume list", r.StatusCode())
		}
		return printRows(cmd.OutOrStdout(), &out, r.JSON200.Volumes, func(v api.CacheVolume) string { return v.Scope }, printVolumes)
	})

	rm := &cobra.Command{
		Use:     "rm SCOPE",
		Aliases: []string{"remove"},
		Short:   "Delete a cache scope's volume (the next build of the scope starts cold)",
		Args:    exactArgs("SCOPE"),
	}
	rm.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.DeleteCacheWithResponse(ctx, args[0])
		if err != nil {
			return cl.transportError(ctx, "delete cache scope "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "deleted cache volume of scope %s\n", args[0])
		return nil
	})

	return groupCommand("cache", "Inspect and delete per-scope cache volumes", ls, rm)
}

// printVolumes is the table of cache ls.
func printVolumes(w io.Writer, list []api.CacheVolume) error {
	now := time.Now()
	tw := newTable(w)
	fmt.Fprintln(tw, "SCOPE\tSIZE\tUSED\tALLOCATED\tLAST-USED\tIN-USE")
	for _, v := range list {
		last := "never"
		if v.LastUsed != nil {
			last = humanAge(now, *v.LastUsed) + " ago"
		}
		inUse := "no"
		if v.InUse {
			inUse = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.Scope, humanSize(v.SizeBytes), humanSize(v.UsedBytes), humanSize(v.AllocatedBytes), last, inUse)
	}
	return tw.Flush()
}

func buildersCommand(g *globals) *cobra.Command {
	var out listOutput
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List builders kept up between builds (needs build:admin)",
		Args:    exactArgs(),
	}
	addListOutputFlags(ls, &out, "scopes")
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		if err := out.check(cmd); err != nil {
			return err
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.ListBuildersWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "list builders", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("list builders: server answered %d without a builder list", r.StatusCode())
		}
		return printRows(cmd.OutOrStdout(), &out, r.JSON200.Builders, func(b api.Builder) string { return b.Scope }, printBuilders)
	})

	stop := &cobra.Command{
		Use:   "stop SCOPE",
		Short: "Stop a cache scope's warm builder (its next build starts a fresh one; the cache stays)",
		Args:  exactArgs("SCOPE"),
	}
	stop.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.StopBuilderWithResponse(ctx, api.StopBuilderRequest{Scope: args[0]})
		if err != nil {
			return cl.transportError(ctx, "stop the builder of scope "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.StatusCode() == http.StatusAccepted {
			fmt.Fprintf(cmd.OutOrStdout(), "the builder of scope %s is running a build; it stops when that build ends\n", args[0])
			return nil
		}
		fmt.Fprintf(cmd.OutOrStdout(), "stopped the builder of scope %s\n", args[0])
		return nil
	})

	return groupCommand("builders", "List and stop builders kept up between a scope's builds", ls, stop)
}

// printBuilders is the table of builders ls.
func printBuilders(w io.Writer, list []api.Builder) error {
	now := time.Now()
	tw := newTable(w)
	fmt.Fprintln(tw, "SCOPE\tRUNTIME\tSTATE\tSTARTED\tLAST-USED\tMEMORY\tBUILDS")
	for _, b := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\t%s ago\t%s\t%d\n", b.Scope, b.Runtime, b.State,
			humanAge(now, b.Started), humanAge(now, b.LastUsed), humanSize(int64(b.MemoryMb)<<20), b.Builds)
	}
	return tw.Flush()
}

func tokenCommand(g *globals) *cobra.Command {
	return groupCommand("token", "Mint, list and revoke API tokens",
		tokenCreateCommand(g),
		tokenListCommand(g),
		tokenRevokeCommand(g),
	)
}

func tokenCreateCommand(g *globals) *cobra.Command {
	var subject, namespace, cacheScope, ttl string
	var scopes []string
	create := &cobra.Command{
		Use:   "create --subject S --scope SCOPES",
		Short: "Mint an API token (needs build:admin); prints the token alone on stdout",
		Long: `Mint an API token (needs build:admin); prints the token alone on stdout.

A token acts for one tenant, its namespace: an image it names without a
namespace (app:1) is stored as <namespace>/app:1, and it cannot touch other
tenants' images or builds. Tokens holding build:admin act across all
namespaces and name images exactly as given.`,
		Example: `  kiln token create --subject ci --scope build:write,image:read --namespace team-a --ttl 720h
  kiln token create --subject ci --scope build:write --cache-scope team-a.ci
  export KILN_TOKEN=$(kiln token create --subject me --scope build:write)`,
		Args: exactArgs(),
	}
	fl := create.Flags()
	fl.StringVar(&subject, "subject", "", "who the token is for (required)")
	fl.StringSliceVar(&scopes, "scope", nil, "comma-separated scopes (required): "+strings.Join(auth.ScopeNames(auth.AllScopes), ", "))
	fl.StringVar(&namespace, "namespace", "", "the tenant the token acts for; its images are named NS/… (default: the cache scope up to its first '.')")
	fl.StringVar(&cacheScope, "cache-scope", "", "cache scope the token's builds use")
	fl.StringVar(&ttl, "ttl", "24h", "lifetime, as a Go duration (24h, 720h)")
	create.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		if subject == "" {
			return usageError(cmd, "--subject is required: say who the token is for")
		}
		parsed, err := auth.ParseScopes(strings.Join(scopes, ","))
		if err != nil {
			return usageError(cmd, "--scope: %v", err)
		}
		if d, err := time.ParseDuration(ttl); err != nil || d <= 0 {
			return usageError(cmd, "invalid --ttl %q: give a positive Go duration such as 24h or 720h", ttl)
		}
		req := api.TokenRequest{Subject: subject, Ttl: &ttl}
		for _, s := range parsed {
			req.Scopes = append(req.Scopes, string(s))
		}
		if cmd.Flags().Changed("namespace") {
			if namespace == "" {
				return usageError(cmd, "--namespace is empty: name the tenant the token acts for, or leave the flag out")
			}
			req.Namespace = &namespace
		}
		if cacheScope != "" {
			req.CacheScope = &cacheScope
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.CreateTokenWithResponse(ctx, req)
		if err != nil {
			return cl.transportError(ctx, "create token", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		tok := r.JSON201
		if tok == nil {
			return fmt.Errorf("create token: server answered %d without a token", r.StatusCode())
		}
		fmt.Fprintln(cmd.OutOrStdout(), tok.Token)
		note := "kiln: token"
		if tok.Id != "" {
			note += " " + tok.Id
		}
		note += " for " + subject
		if tok.Tenant != "" {
			note += " (namespace " + tok.Tenant + ")"
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "%s expires %s\n", note, tok.ExpiresAt.Local().Format(time.RFC3339))
		return nil
	})
	return create
}

func tokenListCommand(g *globals) *cobra.Command {
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List tokens, revoked and expired ones included (needs build:admin)",
		Long: `List the tokens minted through the API, newest first, revoked and expired
ones included (needs build:admin). The tokens themselves are never shown:
the server does not keep them.`,
		Args: exactArgs(),
	}
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.ListTokensWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "list tokens", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("list tokens: server answered %d without a token list", r.StatusCode())
		}
		now := time.Now()
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "ID\tSUBJECT\tNAMESPACE\tSCOPES\tEXPIRES\tREVOKED")
		for _, t := range r.JSON200.Tokens {
			revoked := "-"
			if t.RevokedAt != nil {
				revoked = humanAge(now, *t.RevokedAt) + " ago"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.Id, t.Subject, orDash(t.Tenant),
				orDash(strings.Join(t.Scopes, ",")), humanUntil(now, t.ExpiresAt), revoked)
		}
		return tw.Flush()
	})
	return ls
}

func tokenRevokeCommand(g *globals) *cobra.Command {
	revoke := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a token by its id (needs build:admin)",
		Long: `Revoke a token (needs build:admin). It stops working at once, and so do
the registry tokens it was exchanged for. ID is the token's id, as
'kiln token ls' and 'kiln token create' show it, not the token itself.`,
		Args: exactArgs("ID"),
	}
	revoke.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.RevokeTokenWithResponse(ctx, args[0])
		if err != nil {
			return cl.transportError(ctx, "revoke token "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("revoke token %s: server answered %d without the token", args[0], r.StatusCode())
		}
		fmt.Fprintf(cmd.OutOrStdout(), "revoked token %s (subject %s)\n", r.JSON200.Id, r.JSON200.Subject)
		return nil
	})
	return revoke
}

func whoamiCommand(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "whoami",
		Short: "Show your token's subject, namespace and scopes, and where your images are named",
		Args:  exactArgs(),
	}
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.WhoamiWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "whoami", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("whoami: server answered %d without an identity", r.StatusCode())
		}
		printWhoami(cmd.OutOrStdout(), r.JSON200, time.Now())
		return nil
	})
	return c
}

// printWhoami prints the token's identity as aligned "key: value" lines,
// then a sentence spelling out how the server names the caller's images.
func printWhoami(w io.Writer, who *api.Whoami, now time.Time) {
	tw := newTable(w)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("subject", orDash(who.Subject))
	row("namespace", orDash(who.Tenant))
	row("cache scope", orDash(who.CacheScope))
	row("scopes", orDash(strings.Join(who.Scopes, ", ")))
	row("token id", orDash(who.TokenId))
	expires := "never"
	if !who.ExpiresAt.IsZero() {
		expires = who.ExpiresAt.Local().Format(time.RFC3339) + " (" + humanUntil(now, who.ExpiresAt) + ")"
	}
	row("expires", expires)
	tw.Flush()
	switch {
	case who.Admin:
		fmt.Fprintln(w, "you are an admin: images are named as you give them, in every namespace")
	case who.ImagePrefix != "":
		fmt.Fprintf(w, "images you name app:1 are stored as %sapp:1\n", who.ImagePrefix)
	default:
		fmt.Fprintln(w, "images are named as you give them")
	}
}

func registryCommand(g *globals) *cobra.Command {
	gc := &cobra.Command{
		Use:   "gc",
		Short: "Delete registry blobs no image references any more (needs build:admin)",
		Long: `Deleting an image name drops a reference; the layers only that image used
stay on disk until a garbage collection. gc waits for running builds to
finish, holds queued ones meanwhile, and answers pushes to the registry with
503 (clients retry) while it sweeps.`,
		Args: cobra.NoArgs,
	}
	gc.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.CollectRegistryGarbageWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "collect registry garbage", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		st := r.JSON200
		if st == nil {
			return fmt.Errorf("collect registry garbage: server answered %d without a report", r.StatusCode())
		}
		fmt.Fprintf(cmd.OutOrStdout(), "deleted %d of %d blobs, freed %s (%s left) in %s\n",
			st.BlobsBefore-st.BlobsAfter, st.BlobsBefore, humanSize(st.BytesFreed), humanSize(st.BytesAfter),
			(time.Duration(st.TookMs) * time.Millisecond).String())
		return nil
	})
	return groupCommand("registry", "Maintain kiln's registry", gc)
}
