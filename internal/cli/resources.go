package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
)

func imagesCommand(g *globals) *cobra.Command {
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List image names and their digests",
		Args:    exactArgs(),
	}
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.ListImagesWithResponse(ctx)
		if err != nil {
			return cl.transportError(ctx, "list images", err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("list images: server answered %d without an image list", r.StatusCode())
		}
		now := time.Now()
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "NAME\tDIGEST\tBUILD\tCREATED")
		for _, im := range r.JSON200.Images {
			created := "-"
			if im.CreatedAt != nil {
				created = humanAge(now, *im.CreatedAt)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", im.Name, shortDigest(im.Digest), orDash(str(im.BuildId)), created)
		}
		return tw.Flush()
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

	return groupCommand("images", "List, tag and remove images in kiln's registry", ls, tag, rm)
}

func cacheCommand(g *globals) *cobra.Command {
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List cache volumes, one per cache scope",
		Args:    exactArgs(),
	}
	ls.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
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
		now := time.Now()
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "SCOPE\tSIZE\tUSED\tALLOCATED\tLAST-USED\tIN-USE")
		for _, v := range r.JSON200.Volumes {
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

func tokenCommand(g *globals) *cobra.Command {
	var subject, cacheScope, ttl string
	var scopes []string
	create := &cobra.Command{
		Use:   "create --subject S --scope SCOPES",
		Short: "Mint an API token (needs build:admin); prints the token alone on stdout",
		Example: `  kiln token create --subject ci --scope build:write,image:read --cache-scope team-a --ttl 720h
  export KILN_TOKEN=$(kiln token create --subject me --scope build:write)`,
		Args: exactArgs(),
	}
	names := make([]string, len(auth.AllScopes))
	for i, s := range auth.AllScopes {
		names[i] = string(s)
	}
	fl := create.Flags()
	fl.StringVar(&subject, "subject", "", "who the token is for (required)")
	fl.StringSliceVar(&scopes, "scope", nil, "comma-separated scopes (required): "+strings.Join(names, ", "))
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
		if r.JSON201 == nil {
			return fmt.Errorf("create token: server answered %d without a token", r.StatusCode())
		}
		fmt.Fprintln(cmd.OutOrStdout(), r.JSON201.Token)
		fmt.Fprintf(cmd.ErrOrStderr(), "kiln: token for %s expires %s\n", subject, r.JSON201.ExpiresAt.Local().Format(time.RFC3339))
		return nil
	})
	return groupCommand("token", "Mint API tokens", create)
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
