package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
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
	var out listOutput
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List builds, newest first",
		Example: `  kiln builds ls --status failed
  kiln builds ls -q --limit 5
  kiln builds ls --format json | jq -r .image_digest
  kiln builds ls --format '{{.id}} {{.status}} {{.image}}'`,
		Args: exactArgs(),
	}
	c.Flags().StringVar(&status, "status", "", "only builds in this status: queued, running, succeeded, failed or canceled")
	c.Flags().IntVar(&limit, "limit", 50, "show at most this many builds")
	addListOutputFlags(c, &out, "build IDs")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, _ []string) error {
		if err := out.check(cmd); err != nil {
			return err
		}
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
		return printRows(cmd.OutOrStdout(), &out, builds, func(b api.Build) string { return b.Id },
			func(w io.Writer, builds []api.Build) error { return printBuilds(w, builds, time.Now()) })
	})
	return c
}

func printBuilds(w io.Writer, builds []api.Build, now time.Time) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tSTATUS\tPHASE\tSCOPE\tCACHED/TOTAL\tDIGEST\tAGE")
	for _, b := range builds {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\n",
			b.Id, b.Status, orDash(b.Phase), orDash(b.CacheScope),
			b.StepsCached, b.StepsTotal, orDash(shortDigest(str(b.ImageDigest))), humanAge(now, b.CreatedAt))
	}
	return tw.Flush()
}

func buildsShowCommand(g *globals) *cobra.Command {
	var asJSON bool
	var out listOutput
	c := &cobra.Command{
		Use:     "show ID",
		Aliases: []string{"inspect"},
		Short:   "Show one build",
		Long: `Show one build. ID may be any unique start of the build's id.

--format json prints the build as the API gives it; -q prints its full id.`,
		Example: `  kiln builds show b0k3
  kiln builds show --format '{{.image_digest}}' b0k3`,
		Args: exactArgs("ID"),
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print the build as JSON (same as --format json)")
	addListOutputFlags(c, &out, "build's full ID")
	c.Flags().Lookup("format").Usage = "table, json (the build as the API gives it), or a Go template over its JSON fields, such as '{{.status}}'"
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		if asJSON {
			if cmd.Flags().Changed("format") && out.format != "json" {
				return usageError(cmd, "--json and --format %s do not go together", out.format)
			}
			out.format = "json"
		}
		if err := out.check(cmd); err != nil {
			return err
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		id, err := resolveBuildID(ctx, cl, args[0])
		if err != nil {
			return err
		}
		b, err := cl.getBuild(ctx, id)
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		switch {
		case out.quiet:
			fmt.Fprintln(w, b.Id)
			return nil
		case out.format == "json":
			return printJSON(w, b)
		case out.tmpl != nil:
			return execTemplate(w, out.tmpl, b)
		}
		printBuild(w, b)
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
	row("image", b.Image) // only a succeeded build has one
	row("tags", strings.Join(b.Tags, ", "))
	row("pushed", strings.Join(deref(b.Pushed), ", "))
	row("call", str(b.Call))
	if c := b.Check; c != nil {
		row("check", fmt.Sprintf("%d warnings", c.Warnings))
	}
	row("digest", str(b.ImageDigest))
	row("steps cached", fmt.Sprintf("%d/%d", b.StepsCached, b.StepsTotal))
	row("dedup of", str(b.DedupOf))
	row("queue position", num(b.QueuePosition, ""))
	row("target", str(b.Target))
	row("platforms", strings.Join(deref(b.Platforms), ", "))
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
	row("context source", str(b.ContextSource))
	row("cache from", strings.Join(deref(b.CacheFrom), ", "))
	row("cache to", str(b.CacheTo))
	row("allow", strings.Join(deref(b.Allow), ", "))
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
	var tailArg string
	c := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a build's log",
		Long: `Print a build's log: its phases, steps and their output, one
timestamped line each. ID may be any unique start of the build's id.

With -f, keep printing lines as they arrive, until the build ends; the
lines are the same as without -f. Ctrl-C stops following; the build keeps
running. --tail N prints only the last N lines (with -f: the last N so
far, then what follows).`,
		Example: `  kiln builds logs b0k3
  kiln builds logs -f --tail 20 b0k3`,
		Args: exactArgs("ID"),
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "follow the log until the build ends")
	c.Flags().StringVarP(&tailArg, "tail", "n", "all", "print only the last N lines")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		tail := -1
		if tailArg != "all" {
			n, err := strconv.Atoi(tailArg)
			if err != nil || n < 0 {
				return usageError(cmd, "invalid --tail %q: give a number of lines (0 or more) or all", tailArg)
			}
			tail = n
		}
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		id, err := resolveBuildID(ctx, cl, args[0])
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if !follow {
			if tail < 0 {
				return printLog(ctx, cl, id, out)
			}
			last := &lastLines{n: tail}
			if err := printLog(ctx, cl, id, last); err != nil {
				return err
			}
			io.WriteString(out, strings.Join(last.tail(), ""))
			return nil
		}
		// The stream replays the build's events from the start; with
		// --tail the log so far is fetched first, its last lines printed,
		// and as many lines of the replay skipped: the server renders
		// the plain-text log from the same events, line for line.
		skip := 0
		if tail >= 0 {
			last := &lastLines{n: tail}
			if err := printLog(ctx, cl, id, last); err != nil {
				return err
			}
			io.WriteString(out, strings.Join(last.tail(), ""))
			skip = last.total
		}
		f := &follower{
			c: cl, s: g.settings, id: id,
			onEvent: func(ev api.Event, _ []byte) {
				text := ev.LogLine()
				for skip > 0 && text != "" {
					_, text, _ = strings.Cut(text, "\n")
					skip--
				}
				io.WriteString(out, text)
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

// buildIDChars are the characters of a build id (lower-case Crockford
// base32); ids are "b" and 26 of them.
const buildIDChars = "0123456789abcdefghjkmnpqrstvwxyz"

// resolveBuildID turns a unique start of a build id into the id, through
// GET /v1/builds?id_prefix= (which, like every list, sees only the
// caller's builds). A whole id, or something that cannot start one, is
// returned as given for the server to judge.
func resolveBuildID(ctx context.Context, cl *client, arg string) (string, error) {
	if arg == "" || len(arg) >= 27 || strings.Trim(arg, buildIDChars) != "" {
		return arg, nil
	}
	const show = 10
	limit := show + 1
	r, err := cl.api.ListBuildsWithResponse(ctx, &api.ListBuildsParams{IdPrefix: &arg, Limit: &limit})
	if err != nil {
		return "", cl.transportError(ctx, "find build "+arg, err)
	}
	if err := cl.check(r.HTTPResponse, r.Body); err != nil {
		return "", err
	}
	if r.JSON200 == nil {
		return "", fmt.Errorf("find build %s: server answered %d without a build list", arg, r.StatusCode())
	}
	list := r.JSON200.Builds
	switch len(list) {
	case 0:
		return "", &apiError{Status: http.StatusNotFound, Code: "not_found",
			Message: fmt.Sprintf("no build %s: no build of yours has an id starting with %s (kiln builds ls lists them)", arg, arg)}
	case 1:
		return list[0].Id, nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "build id %s is ambiguous; give more of it. It starts these builds:", arg)
	now := time.Now()
	for i, c := range list {
		if i == show {
			b.WriteString("\n  … and more")
			break
		}
		fmt.Fprintf(&b, "\n  %s  %s  %s ago", c.Id, c.Status, humanAge(now, c.CreatedAt))
	}
	return "", &exitError{code: exitFailure, err: errors.New(b.String())}
}

func buildsCancelCommand(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "cancel ID",
		Short: "Cancel a queued or running build",
		Long: `Cancel a queued or running build. ID may be any unique start of the
build's id.

If the build has already finished, its final state is printed and the exit
status is 1.`,
		Args: exactArgs("ID"),
	}
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		id, err := resolveBuildID(ctx, cl, args[0])
		if err != nil {
			return err
		}
		b, finished, err := cl.cancelBuild(ctx, id)
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
