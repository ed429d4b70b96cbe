package cli

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// The client config file, ~/.config/kiln/config.yaml (under
// $XDG_CONFIG_HOME when set), holds the contexts: named servers to switch
// between, as docker's contexts. It never holds a token, only the path of
// a file that does.
//
//	current_context: prod
//	contexts:
//	  - name: prod
//	    address: https://kiln.example.com
//	    token_file: /home/me/.config/kiln/prod.token
//	    progress: plain
//
// Precedence, as docker's: --addr/--token, then KILN_ADDR/KILN_TOKEN, then
// the context KILN_CONTEXT names or else the current context, then the
// defaults (http://127.0.0.1:7070 and ./kiln-data/admin.token). A context's
// token is only sent to its own address: with --addr or KILN_ADDR the
// context is not used at all.

// clientConfig is the client config file.
type clientConfig struct {
	CurrentContext string         `yaml:"current_context,omitempty"`
	Contexts       []contextEntry `yaml:"contexts"`
}

// contextEntry is one context.
type contextEntry struct {
	Name    string `yaml:"name" json:"name"`
	Address string `yaml:"address" json:"address"`
	// TokenFile is the absolute path of a file holding the token.
	TokenFile string `yaml:"token_file,omitempty" json:"token_file,omitempty"`
	// Progress is kiln build's --progress when not given.
	Progress string `yaml:"progress,omitempty" json:"progress,omitempty"`
}

// defaultContext is the context that stands for no context: the built-in
// defaults. It cannot be created or removed; `kiln context use default`
// clears the current context.
const defaultContext = "default"

var contextNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// configPath is where the client config file lives.
func configPath() (string, error) {
	if d := os.Getenv("XDG_CONFIG_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "kiln", "config.yaml"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find the client config file: %v (set HOME or XDG_CONFIG_HOME)", err)
	}
	return filepath.Join(home, ".config", "kiln", "config.yaml"), nil
}

// loadConfig reads the client config file; a missing file is an empty
// config. It returns the file's path for messages.
func loadConfig() (*clientConfig, string, error) {
	path, err := configPath()
	if err != nil {
		return nil, "", err
	}
	cfg, err := readConfig(path)
	return cfg, path, err
}

func readConfig(path string) (*clientConfig, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &clientConfig{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read client config %s: %v", path, err)
	}
	cfg := &clientConfig{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("client config %s is not valid: %v (fix it, or remove it and recreate the contexts with kiln context create)", path, err)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("client config %s: %v (fix it, or remove it and recreate the contexts with kiln context create)", path, err)
	}
	return cfg, nil
}

func (c *clientConfig) validate() error {
	seen := map[string]bool{}
	for i, e := range c.Contexts {
		switch {
		case !contextNameRE.MatchString(e.Name) || e.Name == defaultContext:
			return fmt.Errorf("context %d has no valid name (%q)", i+1, e.Name)
		case seen[e.Name]:
			return fmt.Errorf("context %q is listed twice", e.Name)
		case e.Address == "":
			return fmt.Errorf("context %q has no address", e.Name)
		case e.Progress != "" && !validProgress(e.Progress):
			return fmt.Errorf("context %q: progress %q is not one of %s", e.Name, e.Progress, progressModes)
		}
		seen[e.Name] = true
	}
	return nil
}

func validProgress(p string) bool {
	switch p {
	case progressAuto, progressTTY, progressPlain, progressJSON, progressQuiet, progressRawJSON:
		return true
	}
	return false
}

// find returns the context called name, or nil.
func (c *clientConfig) find(name string) *contextEntry {
	for i := range c.Contexts {
		if c.Contexts[i].Name == name {
			return &c.Contexts[i]
		}
	}
	return nil
}

// names lists the contexts' names, default first, for messages.
func (c *clientConfig) names() string {
	n := []string{defaultContext}
	for _, e := range c.Contexts {
		n = append(n, e.Name)
	}
	return strings.Join(n, ", ")
}

// unknownContext is the error for a context name that is not in the file.
func (c *clientConfig) unknownContext(name, path string) error {
	return fmt.Errorf("no context %q in %s; the contexts are: %s (create one with kiln context create %s --addr URL --token-file FILE)", name, path, c.names(), name)
}

// save writes the config to path atomically, readable by its owner only:
// a temporary file in the same directory, synced, then renamed over the
// old one, so a crash leaves the old file or the new one, never half.
func (c *clientConfig) save(path string) error {
	slices.SortStableFunc(c.Contexts, func(a, b contextEntry) int { return strings.Compare(a.Name, b.Name) })
	data, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %v", dir, err)
	}
	f, err := os.CreateTemp(dir, ".config.yaml.*")
	if err != nil {
		return fmt.Errorf("write client config: %v", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename there is nothing to remove
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("write client config: %v", err)
	}
	header := "# kiln client config: contexts (kiln context --help). Tokens are never stored here, only token_file paths.\n"
	if _, err := f.Write(append([]byte(header), data...)); err != nil {
		f.Close()
		return fmt.Errorf("write client config %s: %v", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write client config %s: %v", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write client config %s: %v", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write client config %s: %v", path, err)
	}
	return nil
}

// endpoint is where the client's requests go, with where each part came
// from, for errors and `kiln context show`.
type endpoint struct {
	// Context is the context in use ("default" for none) and
	// ContextSource why it is the one (KILN_CONTEXT, the config file).
	Context       string `json:"context"`
	ContextSource string `json:"context_source"`
	Address       string `json:"address"`
	AddressSource string `json:"address_source"`
	// Token is never printed.
	Token       string `json:"-"`
	TokenSource string `json:"token_source"`
	Progress    string `json:"progress,omitempty"`
	ConfigFile  string `json:"config_file,omitempty"`
}

// resolveEndpoint applies the precedence: flags (when set), environment,
// context, defaults. flagAddr and flagToken are "" when not given.
func resolveEndpoint(flagAddr, flagToken string) (*endpoint, error) {
	ep := &endpoint{Context: defaultContext, ContextSource: "no context set"}
	envAddr := os.Getenv("KILN_ADDR")
	envToken := os.Getenv("KILN_TOKEN")

	switch {
	case flagAddr != "":
		ep.Address, ep.AddressSource = flagAddr, "--addr"
	case envAddr != "":
		ep.Address, ep.AddressSource = envAddr, "KILN_ADDR"
	}
	switch {
	case flagToken != "":
		ep.Token, ep.TokenSource = flagToken, "--token"
	case envToken != "":
		ep.Token, ep.TokenSource = envToken, "KILN_TOKEN"
	}

	// The context is read only when it can matter: with the address from
	// a flag or the environment it cannot (its token is for its own
	// server), so a broken config file never stands in the way.
	var ctxEntry *contextEntry
	if ep.Address == "" {
		cfg, path, err := loadConfig()
		if err != nil {
			return nil, err
		}
		ep.ConfigFile = path
		name, source := cfg.CurrentContext, "current context in "+path
		if v := os.Getenv("KILN_CONTEXT"); v != "" {
			name, source = v, "KILN_CONTEXT"
		}
		if name != "" && name != defaultContext {
			ctxEntry = cfg.find(name)
			if ctxEntry == nil {
				if source == "KILN_CONTEXT" {
					return nil, fmt.Errorf("KILN_CONTEXT names %s", cfg.unknownContext(name, path))
				}
				return nil, fmt.Errorf("the current context is %q but there is %s; pick another with kiln context use NAME", name, cfg.unknownContext(name, path))
			}
			ep.Context, ep.ContextSource = name, source
			ep.Address, ep.AddressSource = ctxEntry.Address, "context "+name
			ep.Progress = ctxEntry.Progress
		} else if name == defaultContext {
			ep.ContextSource = source
		}
	}
	if ep.Address == "" {
		ep.Address, ep.AddressSource = defaultAddr, "default"
	}
	if ep.Token == "" {
		switch {
		case ctxEntry != nil && ctxEntry.TokenFile != "":
			b, err := os.ReadFile(ctxEntry.TokenFile)
			if err != nil {
				return nil, fmt.Errorf("context %q: cannot read its token file %s: %v (fix the file, or recreate the context with another --token-file)", ctxEntry.Name, ctxEntry.TokenFile, unwrapPath(err))
			}
			tok := strings.TrimSpace(string(b))
			if tok == "" {
				return nil, fmt.Errorf("context %q: its token file %s is empty; put the token in it (kiln token create … prints one)", ctxEntry.Name, ctxEntry.TokenFile)
			}
			ep.Token, ep.TokenSource = tok, ctxEntry.TokenFile+" (context "+ctxEntry.Name+")"
		case ctxEntry != nil:
			// A context without a token file gets none: the local admin
			// token is for the local server.
		default:
			if b, err := os.ReadFile(adminTokenRel); err == nil {
				ep.Token, ep.TokenSource = strings.TrimSpace(string(b)), "./"+adminTokenRel
			}
		}
	}
	return ep, nil
}
