package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// Exit codes, distinct so scripts can tell a failed build from a typo.
const (
	exitFailure     = 1   // the build failed, or the API refused
	exitUsage       = 2   // bad command line; nothing was sent
	exitInterrupted = 130 // SIGINT/SIGTERM/SIGHUP, as a shell reports SIGINT
)

// exitError attaches an exit code to an error.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageError marks a mistake on the command line. The hint names the help
// command of the command that was run.
func usageError(cmd *cobra.Command, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if cmd != nil {
		msg += fmt.Sprintf("\nSee '%s --help'.", cmd.CommandPath())
	}
	return &exitError{code: exitUsage, err: errors.New(msg)}
}

// interrupted is the error of a command stopped by Ctrl-C.
func interrupted(format string, args ...any) error {
	return &exitError{code: exitInterrupted, err: fmt.Errorf(format, args...)}
}

// ExitCode maps an error returned by a command to the process exit code: 0
// for nil, 2 for a usage error, 130 for an interrupt, 1 for anything else
// (a failed build, an API error, an unreachable server).
func ExitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	// Errors cobra raises itself at the root (whose flags and argument
	// checks are not ours to wrap) are plain errors; recognise them by the
	// wording cobra and pflag use.
	msg := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "flag needs an argument", "invalid argument", "required flag", "accepts ", "requires at least", "bad flag syntax"} {
		if strings.HasPrefix(msg, p) {
			return exitUsage
		}
	}
	return exitFailure
}

// settings are the timings of the client. Tests shorten them; users get
// defaultSettings.
type settings struct {
	// reconnectMin and reconnectMax bound the backoff between attempts to
	// reopen the events stream.
	reconnectMin, reconnectMax time.Duration
	// streamFailures is how many attempts in a row may fail before the
	// client also polls GET /v1/builds/{id}.
	streamFailures int
	pollInterval   time.Duration
	// idleTimeout: a stream that sent nothing, not even the 15 s heartbeat
	// comment, for this long is treated as a dead connection.
	idleTimeout time.Duration
	// redraw is the minimum interval between repaints of the tty view.
	redraw time.Duration
	// cancelTimeout bounds the cancel request sent after Ctrl-C, when the
	// command's own context is already gone.
	cancelTimeout time.Duration
	// completionTimeout bounds the server request of a shell completion.
	completionTimeout time.Duration
}

var defaultSettings = settings{
	reconnectMin:   500 * time.Millisecond,
	reconnectMax:   5 * time.Second,
	streamFailures: 3,
	pollInterval:   2 * time.Second,
	idleTimeout:    45 * time.Second,
	redraw:         100 * time.Millisecond,
	cancelTimeout:  15 * time.Second,

	completionTimeout: 2 * time.Second,
}

// Commands returns the client commands (build, builds, images, cache,
// token, whoami, run, registry, context) for the kiln root command. Each
// but context carries the global --addr and --token flags, because the
// root command belongs to cmd/kiln.
func Commands() []*cobra.Command { return newCommands(defaultSettings) }

// Run executes a kiln client command line (args without the program name)
// in-process and returns its exit code; it never exits the process. Errors
// are printed to stderr the way cmd/kiln prints them.
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	return run(ctx, args, stdin, stdout, stderr, defaultSettings)
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, s settings) int {
	root := &cobra.Command{Use: "kiln", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(newCommands(s)...)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "kiln:", err)
	}
	return ExitCode(err)
}

func newCommands(s settings) []*cobra.Command {
	g := &globals{settings: s}
	cmds := []*cobra.Command{
		buildCommand(g),
		buildsCommand(g),
		imagesCommand(g),
		cacheCommand(g),
		buildersCommand(g),
		tokenCommand(g),
		whoamiCommand(g),
		runCommand(g),
		registryCommand(g),
	}
	for _, c := range cmds {
		g.addFlags(c)
	}
	installCompletions(g, cmds)
	// context only edits the client config: no --addr or --token.
	cmds = append(cmds, contextCommand(g))
	for _, c := range cmds {
		c.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
			return usageError(cmd, "%v", err)
		})
	}
	return cmds
}

// globals holds the flags every client command shares.
type globals struct {
	settings
	addr  string
	token string
}

const (
	defaultAddr   = "http://127.0.0.1:7070"
	adminTokenRel = "kiln-data/admin.token"
)

func (g *globals) addFlags(c *cobra.Command) {
	f := c.PersistentFlags()
	f.StringVar(&g.addr, "addr", "", "kiln server URL (env KILN_ADDR; default: the current context's, else "+defaultAddr+"; see kiln context)")
	f.StringVar(&g.token, "token", "", "kiln API token (env KILN_TOKEN; default: the current context's token file, else ./"+adminTokenRel+" when it exists)")
}

// runE wraps a command body: it gives it a context canceled by SIGINT,
// SIGTERM or SIGHUP (a closed terminal, a CI runner stopping the job), and
// turns an interrupt into exit code 130. Bodies that must act
// on an interrupt (cancel a build) check ctx themselves and return their
// own error.
func (g *globals) runE(body func(ctx context.Context, cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
		defer stop()
		err := body(ctx, cmd, args)
		if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
			var ee *exitError
			if !errors.As(err, &ee) {
				return interrupted("interrupted")
			}
		}
		return err
	}
}

// client builds an API client from --addr/--token and their fallbacks:
// KILN_ADDR/KILN_TOKEN, the context (KILN_CONTEXT or the current one, see
// config.go), the defaults.
func (g *globals) client(cmd *cobra.Command) (*client, error) {
	ep, err := g.endpoint(cmd)
	if err != nil {
		return nil, &exitError{code: exitUsage, err: err}
	}
	c, err := newClient(ep.Address, ep.Token, ep.TokenSource)
	if err != nil {
		if ep.AddressSource != "--addr" && ep.AddressSource != "KILN_ADDR" {
			err = fmt.Errorf("%v; it comes from %s", err, ep.AddressSource)
		}
		return nil, usageError(cmd, "%v", err)
	}
	c.context = ep.Context
	return c, nil
}

// endpoint resolves where requests go and with which token.
func (g *globals) endpoint(cmd *cobra.Command) (*endpoint, error) {
	var addr, token string
	if f := cmd.Flags().Lookup("addr"); f != nil && f.Changed {
		addr = g.addr
	}
	if f := cmd.Flags().Lookup("token"); f != nil && f.Changed {
		token = g.token
	}
	return resolveEndpoint(addr, token)
}

// progressDefault is kiln build's --progress when the flag is not given:
// the context's progress setting, or "" for the built-in default. A
// broken config file is reported by g.client, not here.
func (g *globals) progressDefault(cmd *cobra.Command) string {
	ep, err := g.endpoint(cmd)
	if err != nil {
		return ""
	}
	return ep.Progress
}

// exactArgs is cobra.ExactArgs with a usage error and the argument names.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(names) == 0 && len(args) > 0 {
			return usageError(cmd, "%q takes no arguments (got %q)", cmd.CommandPath(), args)
		}
		if len(args) != len(names) {
			return usageError(cmd, "%q takes %s; got %d argument(s)", cmd.CommandPath(), strings.Join(names, " "), len(args))
		}
		return nil
	}
}

// groupCommand is a command that only holds subcommands: alone it prints
// its help, with anything else it is a usage error (cobra would otherwise
// silently print help for a misspelt subcommand).
func groupCommand(use, short string, subs ...*cobra.Command) *cobra.Command {
	c := &cobra.Command{
		Use:   use,
		Short: short,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError(cmd, "unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	c.AddCommand(subs...)
	return c
}
