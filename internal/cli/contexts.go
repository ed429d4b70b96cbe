package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
)

// contextCommand is `kiln context`: named servers, as docker's contexts.
// Its subcommands only touch the client config file; none talks to a
// server, so they have no --addr or --token.
func contextCommand(g *globals) *cobra.Command {
	c := groupCommand("context", "Manage contexts: named kiln servers with their token file, to switch between",
		contextListCommand(g),
		contextCreateCommand(g),
		contextUseCommand(g),
		contextRemoveCommand(g),
		contextShowCommand(g),
	)
	c.Long = `A context names a kiln server: its address, the file holding the token to
use with it, and kiln build's default --progress. They live in
~/.config/kiln/config.yaml ($XDG_CONFIG_HOME/kiln/config.yaml when set),
which holds token file paths, never tokens.

Which server a command talks to, first match wins:
  1. --addr and --token
  2. KILN_ADDR and KILN_TOKEN
  3. the context KILN_CONTEXT names, else the current context (kiln context use)
  4. http://127.0.0.1:7070 with ./kiln-data/admin.token
A context's token is only sent to its own address: with --addr or
KILN_ADDR no context is used. The context "default" stands for 4.`
	c.Example = `  kiln context create prod --addr https://kiln.example.com --token-file ~/.config/kiln/prod.token
  kiln context use prod
  kiln builds ls                      # asks prod
  KILN_CONTEXT=default kiln builds ls  # asks the local server
  kiln context ls`
	return c
}

// contextRow is a row of kiln context ls (and its JSON).
type contextRow struct {
	contextEntry
	Current bool `json:"current"`
}

func contextListCommand(g *globals) *cobra.Command {
	var out listOutput
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List contexts; * marks the one in use",
		Args:    exactArgs(),
	}
	addListOutputFlags(c, &out, "names")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if err := out.check(cmd); err != nil {
			return err
		}
		cfg, _, err := loadConfig()
		if err != nil {
			return err
		}
		current := cfg.CurrentContext
		if v := os.Getenv("KILN_CONTEXT"); v != "" {
			current = v
		}
		if current == "" {
			current = defaultContext
		}
		rows := []contextRow{{contextEntry: contextEntry{Name: defaultContext, Address: defaultAddr, TokenFile: "./" + adminTokenRel}, Current: current == defaultContext}}
		for _, e := range cfg.Contexts {
			rows = append(rows, contextRow{contextEntry: e, Current: e.Name == current})
		}
		return printRows(cmd.OutOrStdout(), &out, rows, func(r contextRow) string { return r.Name }, printContexts)
	}
	return c
}

func printContexts(w io.Writer, rows []contextRow) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "NAME\tADDRESS\tTOKEN FILE\tPROGRESS\tCURRENT")
	for _, r := range rows {
		cur := ""
		if r.Current {
			cur = "*"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Name, r.Address, orDash(r.TokenFile), orDash(r.Progress), cur)
	}
	return tw.Flush()
}

func contextCreateCommand(g *globals) *cobra.Command {
	var e contextEntry
	var use bool
	c := &cobra.Command{
		Use:   "create NAME --addr URL [--token-file FILE] [--progress MODE]",
		Short: "Create a context: a kiln server's address and the file holding its token",
		Long: `Create a context. The token file holds the token alone (what kiln token
create prints); its path is stored (made absolute), never the token, and it
is read on every command, so a rotated token needs no change here.`,
		Example: `  kiln token create --subject me --scope build:write > ~/.config/kiln/prod.token
  kiln context create prod --addr https://kiln.example.com --token-file ~/.config/kiln/prod.token --use`,
		Args: exactArgs("NAME"),
	}
	c.Flags().StringVar(&e.Address, "addr", "", "the server's URL, http(s)://host:port (required)")
	c.Flags().StringVar(&e.TokenFile, "token-file", "", "file holding the token for this server")
	c.Flags().StringVar(&e.Progress, "progress", "", "kiln build's --progress when not given: "+progressModes)
	c.Flags().BoolVar(&use, "use", false, "also make it the current context")
	c.ValidArgsFunction = cobra.NoFileCompletions
	c.RunE = func(cmd *cobra.Command, args []string) error {
		e.Name = args[0]
		switch {
		case e.Name == defaultContext:
			return usageError(cmd, "%q is the built-in context (the defaults); give another name", defaultContext)
		case !contextNameRE.MatchString(e.Name):
			return usageError(cmd, "invalid context name %q: use letters, digits, '.', '_' and '-', starting with a letter or digit", e.Name)
		case e.Address == "":
			return usageError(cmd, "--addr is required: the server's URL, such as https://kiln.example.com")
		case e.Progress != "" && !validProgress(e.Progress):
			return usageError(cmd, "invalid --progress %q: use %s", e.Progress, progressModes)
		}
		cl, err := newClient(e.Address, "", "")
		if err != nil {
			return usageError(cmd, "%v", strings.Replace(err.Error(), " (--addr or KILN_ADDR)", "", 1))
		}
		e.Address = cl.base
		if e.TokenFile != "" {
			abs, err := filepath.Abs(expandHome(e.TokenFile))
			if err != nil {
				return usageError(cmd, "--token-file %s: %v", e.TokenFile, err)
			}
			b, err := os.ReadFile(abs)
			if err != nil {
				return usageError(cmd, "--token-file %s: cannot read it: %v; write the token into it first (kiln token create … > FILE)", abs, unwrapPath(err))
			}
			if strings.TrimSpace(string(b)) == "" {
				return usageError(cmd, "--token-file %s is empty; write the token into it first (kiln token create … > FILE)", abs)
			}
			e.TokenFile = abs
		}
		cfg, path, err := loadConfig()
		if err != nil {
			return err
		}
		if cfg.find(e.Name) != nil {
			return fmt.Errorf("context %q already exists in %s; remove it first (kiln context rm %s) or pick another name", e.Name, path, e.Name)
		}
		cfg.Contexts = append(cfg.Contexts, e)
		if use {
			cfg.CurrentContext = e.Name
		}
		if err := cfg.save(path); err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		fmt.Fprintln(w, e.Name)
		if use {
			fmt.Fprintf(cmd.ErrOrStderr(), "created context %q (%s) and made it current\n", e.Name, e.Address)
		} else {
			fmt.Fprintf(cmd.ErrOrStderr(), "created context %q (%s); switch to it with kiln context use %s\n", e.Name, e.Address, e.Name)
		}
		return nil
	}
	return c
}

func contextUseCommand(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "use NAME",
		Short: `Make a context the current one ("default": the built-in defaults)`,
		Args:  exactArgs("NAME"),
	}
	c.ValidArgsFunction = completeContexts(true)
	c.RunE = func(cmd *cobra.Command, args []string) error {
		cfg, path, err := loadConfig()
		if err != nil {
			return err
		}
		name := args[0]
		switch {
		case name == defaultContext:
			cfg.CurrentContext = ""
		case cfg.find(name) == nil:
			return cfg.unknownContext(name, path)
		default:
			cfg.CurrentContext = name
		}
		if err := cfg.save(path); err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), name)
		if v := os.Getenv("KILN_CONTEXT"); v != "" && v != name {
			fmt.Fprintf(cmd.ErrOrStderr(), "note: KILN_CONTEXT=%s is set and wins over the current context; unset it to use %s\n", v, name)
		}
		if v := os.Getenv("KILN_ADDR"); v != "" {
			fmt.Fprintf(cmd.ErrOrStderr(), "note: KILN_ADDR=%s is set and wins over any context; unset it to use %s\n", v, name)
		}
		return nil
	}
	return c
}

func contextRemoveCommand(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Remove contexts (their token files stay)",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError(cmd, "%q takes one or more context names", cmd.CommandPath())
			}
			return nil
		},
	}
	c.ValidArgsFunction = completeContexts(false)
	c.RunE = func(cmd *cobra.Command, args []string) error {
		cfg, path, err := loadConfig()
		if err != nil {
			return err
		}
		for _, name := range args {
			if name == defaultContext {
				return fmt.Errorf("the context %q is built in and cannot be removed", defaultContext)
			}
			if cfg.find(name) == nil {
				return cfg.unknownContext(name, path)
			}
		}
		for _, name := range args {
			for i := range cfg.Contexts {
				if cfg.Contexts[i].Name == name {
					cfg.Contexts = append(cfg.Contexts[:i], cfg.Contexts[i+1:]...)
					break
				}
			}
			if cfg.CurrentContext == name {
				cfg.CurrentContext = ""
				fmt.Fprintf(cmd.ErrOrStderr(), "%s was the current context; now none is (the defaults apply)\n", name)
			}
		}
		if err := cfg.save(path); err != nil {
			return err
		}
		for _, name := range args {
			fmt.Fprintln(cmd.OutOrStdout(), name)
		}
		return nil
	}
	return c
}

func contextShowCommand(g *globals) *cobra.Command {
	var format string
	c := &cobra.Command{
		Use:   "show",
		Short: "Show the context in use, and where the address and token come from",
		Long: `Show the context in use and what it resolves to: the address, where the
token comes from (never the token), kiln build's default progress. KILN_ADDR,
KILN_TOKEN and KILN_CONTEXT are taken into account. -q prints the context's
name alone, as docker context show does.`,
		Args: exactArgs(),
	}
	quiet := false
	c.Flags().StringVar(&format, "format", "", "json, or a Go template over the JSON object, such as '{{.address}}' (default: text)")
	c.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the context's name")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		out := listOutput{format: format}
		if format == "" {
			out.format = "table"
		}
		if err := out.check(cmd); err != nil {
			return err
		}
		ep, err := resolveEndpoint("", "")
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		switch {
		case quiet:
			fmt.Fprintln(w, ep.Context)
			return nil
		case out.format == "json":
			return printJSON(w, ep)
		case out.tmpl != nil:
			return execTemplate(w, out.tmpl, ep)
		}
		tw := newTable(w)
		fmt.Fprintf(tw, "context:\t%s\t(%s)\n", ep.Context, ep.ContextSource)
		fmt.Fprintf(tw, "address:\t%s\t(%s)\n", ep.Address, ep.AddressSource)
		tok := ep.TokenSource
		if tok == "" {
			tok = "none"
		}
		fmt.Fprintf(tw, "token from:\t%s\n", tok)
		fmt.Fprintf(tw, "progress:\t%s\n", orDash(ep.Progress))
		if ep.ConfigFile != "" {
			fmt.Fprintf(tw, "config file:\t%s\n", ep.ConfigFile)
		}
		return tw.Flush()
	}
	return c
}

// expandHome turns a leading ~/ into the home directory, for paths the
// shell did not expand (--token-file=~/x).
func expandHome(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, p[1:])
		}
	}
	return p
}

// unwrapPath drops the path from a *os.PathError, for messages that name
// the file already.
func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
