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
)

func buildsCommand(g *globals) *cobra.Command {
	return groupCommand("builds", "List, inspect, follow and cancel builds",
		buildsListCommand(g),
		buildsShowCommand(g),
		buildsLogsCommand(g),
		buildsCancelCommand(g),
	)
}

// maxPage is the API's largest page size.
const maxPage = 500

func buildsListCommand(g *globals) *cobra.Command {
	var status string
	var limit int
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List builds, newest first",
		Args:    exactArgs(),
	}
	c.Flags().StringVar(&status, "status", "", "only builds in this status: queued, running, succeeded, failed or canceled")
	c.Flags().IntVar(&limit, "limit", 50, "show at most this many builds")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		var params api.ListBuildsParams
		if status != "" {
			st := api.BuildStatus(status)
			if !st.Valid() {
				return usageError(cmd, "invalid --status %q: use queued, running, succeeded, failed or canceled", status)
			}
			params.Status = &st
		}
		if limit < 1 {
			return usageError(cmd, "--limit must be at least 1, got %d", limit)
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		var builds []api.Build
		for len(builds) < limit {
			page := min(limit-len(builds), maxPage)
			params.Limit = &page
			r, err := cl.api.ListBuildsWithResponse(ctx, &params)
			if err != nil {
				return cl.transportError(ctx, "list builds", err)
			}
			if err := cl.check(r.HTTPResponse, r.Body); err != nil {
				return err
			}
			if r.JSON200 == nil {
				return fmt.Errorf("list builds: server answered %d without a build list", r.StatusCode())
			}
			builds = append(builds, r.JSON200.Builds...)
			next := deref(r.JSON200.NextCursor)
			if next == "" || len(r.JSON200.Builds) == 0 {
				break
			}
			params.Cursor = &next
		}
		if len(builds) > limit {
			builds = builds[:limit]
		}
		printBuilds(cmd.OutOrStdout(), builds, time.Now())
		return nil
	})
	return c
}

func printBuilds(w io.Writer, builds []api.Build, now time.Time) {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tSTATUS\tPHASE\tSCOPE\tCACHED/TOTAL\tDIGEST\tAGE")
	for _, b := range builds {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\n",
			b.Id, b.Status, orDash(b.Phase), orDash(b.CacheScope),
			b.StepsCached, b.StepsTotal, orDash(shortDigest(str(b.ImageDigest))), humanAge(now, b.CreatedAt))
	}
	tw.Flush()
}

func buildsShowCommand(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:     "show ID",
		Aliases: []string{"inspect"},
		Short:   "Show one build",
		Args:    exactArgs("ID"),
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print the build as JSON")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		b, err := cl.getBuild(ctx, args[0])
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(cmd.OutOrStdout(), b)
		}
		printBuild(cmd.OutOrStdout(), b)
		return nil
	})
	return c
}

// printBuild prints a build as aligned "key: value" lines, leaving out
// what is unset.
func printBuild(w io.Writer, b *api.Build) {
	tw := newTable(w)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	tm := func(t *time.Time) string {
		if t == nil {
			return ""
		}
		return t.Local().Format(time.RFC3339)
	}
	num := func(p *int, unit string) string {
		if p == nil {
			return ""
		}
		return fmt.Sprintf("%d%s", *p, unit)
	}
	row("id", b.Id)
	row("status", string(b.Status))
	row("phase", b.Phase)
	row("error", str(b.Error))
	row("namespace", str(b.Tenant))
	row("cache scope", b.CacheScope)
	row("subject", str(b.Subject))
	row("image", b.Image)
	row("tags", strings.Join(b.Tags, ", "))
	row("digest", str(b.ImageDigest))
	row("steps cached", fmt.Sprintf("%d/%d", b.StepsCached, b.StepsTotal))
	row("dedup of", str(b.DedupOf))
	row("queue position", num(b.QueuePosition, ""))
	row("target", str(b.Target))
	if deref(b.NoCache) {
		row("no cache", "true")
	}
	if deref(b.Pull) {
		row("pull", "true")
	}
	row("runtime", b.Runtime)
	if b.BuilderReused != nil {
		row("builder", map[bool]string{true: "reused (kept up from an earlier build of the scope)", false: "started for this build"}[*b.BuilderReused])
	}
	row("cpus", num(b.Cpus, ""))
	row("memory", num(b.MemoryMb, " MB"))
	row("disk", num(b.DiskGb, " GB"))
	row("timeout", num(b.TimeoutSeconds, "s"))
	if b.ContextBytes != nil {
		row("context", humanSize(*b.ContextBytes))
	}
	row("created", tm(&b.CreatedAt))
	row("started", tm(b.StartedAt))
	row("finished", tm(b.FinishedAt))
	if b.StartedAt != nil && b.FinishedAt != nil {
		row("duration", seconds(b.FinishedAt.Sub(*b.StartedAt)))
	}
	if b.Timings != nil {
		var parts []string
		for _, name := range []string{"queued", "builder_start", "context_transfer", "solve", "export", "push"} {
			if v, ok := (*b.Timings)[name]; ok {
				parts = append(parts, fmt.Sprintf("%s %s", strings.ReplaceAll(name, "_", " "), seconds(time.Duration(v*float64(time.Second)))))
			}
		}
		row("time spent", strings.Join(parts, ", "))
	}
	tw.Flush()
}

func buildsLogsCommand(g *globals) *cobra.Command {
	var follow bool
	c := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a build's log",
		Long: `Print a build's log.

With -f, follow the build's event stream and print log output as it
arrives, until the build ends. Ctrl-C stops following; the build keeps
running.`,
		Args: exactArgs("ID"),
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "follow the log until the build ends")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		id, out := args[0], cmd.OutOrStdout()
		if !follow {
			return printLog(ctx, cl, id, out)
		}
		f := &follower{
			c: cl, s: g.settings, id: id,
			onEvent: func(ev api.Event, _ []byte) {
				if ev.Kind == "log" {
					io.WriteString(out, str(ev.Data))
				}
			},
			onNote: func(msg string) { fmt.Fprintf(cmd.ErrOrStderr(), "kiln: %s\n", msg) },
		}
		b, err := f.follow(ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "kiln: build %s %s\n", b.Id, b.Status)
		return nil
	})
	return c
}

// printLog copies the plain-text log to w as it downloads.
func printLog(ctx context.Context, cl *client, id string, w io.Writer) error {
	resp, err := cl.api.BuildLogs(ctx, id)
	if err != nil {
		return cl.transportError(ctx, "log of build "+id, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return cl.readError(resp)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("read log of build %s: %w", id, err)
	}
	return nil
}

func buildsCancelCommand(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "cancel ID",
		Short: "Cancel a queued or running build",
		Long: `Cancel a queued or running build.

If the build has already finished, its final state is printed and the exit
status is 1.`,
		Args: exactArgs("ID"),
	}
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		b, finished, err := cl.cancelBuild(ctx, args[0])
		if err != nil {
			return err
		}
		if finished {
			printBuild(cmd.OutOrStdout(), b)
			return &exitError{code: exitFailure, err: fmt.Errorf("build %s had already finished (%s); nothing to cancel", b.Id, b.Status)}
		}
		fmt.Fprintf(cmd.OutOrStdout(), "build %s canceled\n", b.Id)
		return nil
	})
	return c
}
