package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
)

// runCommand is `kiln run IMAGE [-- CMD...]`: the server boots the image's
// converted root filesystem in a microVM and streams what it prints; the
// command exits with the image process's exit code.
func runCommand(g *globals) *cobra.Command {
	var env []string
	var memoryMB, cpus int
	c := &cobra.Command{
		Use:   "run IMAGE [-- CMD...]",
		Short: "Boot an image in a microVM and run its entrypoint/cmd (or CMD), exiting with its exit code",
		Args:  cobra.MinimumNArgs(1),
	}
	c.Flags().StringArrayVarP(&env, "env", "e", nil, "KEY=VALUE added to the image's environment; repeatable")
	c.Flags().IntVar(&memoryMB, "memory", 0, "VM memory in MB (default 512)")
	c.Flags().IntVar(&cpus, "cpus", 0, "VM CPUs (default 1)")
	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		req := api.RunRequest{}
		if len(args) > 1 {
			rest := args[1:]
			req.Args = &rest
		}
		if len(env) > 0 {
			req.Env = &env
		}
		if memoryMB > 0 {
			req.MemoryMb = &memoryMB
		}
		if cpus > 0 {
			req.Cpus = &cpus
		}
		code, err := cl.runImage(ctx, args[0], req, cmd.OutOrStdout(), cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		if code != 0 {
			return &exitError{code: code, err: fmt.Errorf("%s exited with code %d", args[0], code)}
		}
		return nil
	})
	return c
}

// runImage posts a run and copies its NDJSON output stream to stdout and
// stderr; it returns the process's exit code.
func (c *client) runImage(ctx context.Context, name string, req api.RunRequest, stdout, stderr io.Writer) (int, error) {
	body, _ := json.Marshal(req)
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("/v1/images/"+url.PathEscape(name)+"/run"), bytes.NewReader(body))
	if err != nil {
		return -1, err
	}
	c.authorize(r)
	r.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(r)
	if err != nil {
		return -1, c.transportError(ctx, "run "+name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return -1, c.readError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 8<<20)
	for sc.Scan() {
		var out api.RunOutput
		if err := json.Unmarshal(sc.Bytes(), &out); err != nil {
			return -1, fmt.Errorf("run %s: unreadable output line from the server: %v", name, err)
		}
		switch {
		case out.ExitCode != nil:
			if out.Error != nil && *out.ExitCode < 0 {
				return -1, fmt.Errorf("run %s: %s", name, *out.Error)
			}
			return *out.ExitCode, nil
		case out.Data != nil && out.Stream != nil && string(*out.Stream) == "stderr":
			io.WriteString(stderr, *out.Data)
		case out.Data != nil:
			io.WriteString(stdout, *out.Data)
		}
	}
	if ctx.Err() != nil {
		return -1, ctx.Err()
	}
	return -1, fmt.Errorf("run %s: the server closed the stream before the process exited (%v)", name, sc.Err())
}
