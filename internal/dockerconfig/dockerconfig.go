// Package dockerconfig reads registry credentials from the docker client's
// configuration, so `kiln build --push` to another registry works with
// whatever `docker login` or a credential helper already set up, with no
// kiln-specific login and with the same answer docker and buildx would
// give. It only reads: kiln never writes the docker config.
//
// It follows docker/cli (cli/config, configfile, credentials) with these
// deliberate differences, all in the direction of finding what the user
// plainly meant:
//
//   - "registry-1.docker.io" is Docker Hub too (BuildKit's session asks
//     for that host), not only "docker.io" and "index.docker.io".
//   - A key of auths or credHelpers that docker matches only exactly (the
//     Hub's "https://index.docker.io/v1/", any credHelpers key) also
//     matches by normalised host, after the exact key, so "docker.io" in a
//     Kubernetes-style config works. Hosts compare case-insensitively.
//   - Several keys for one host resolve in sorted order, not map order.
//   - A malformed DOCKER_AUTH_CONFIG is an error, where docker warns and
//     ignores it: ignoring it would surface later as a baffling 401.
//   - No platform default helper is guessed for a config with no
//     credentials at all (docker would try docker-credential-pass or
//     -secretservice): `docker login` writes credsStore into the file, so
//     guessing only matters for configs that hold nothing, and it would
//     run a helper, maybe a keychain prompt, for every anonymous push.
//   - "registrytoken" entries are ignored: Credentials cannot carry a
//     ready-made bearer token.
package dockerconfig

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
)

// hubKey is where docker keeps Docker Hub's credentials, for history's sake.
const hubKey = "https://index.docker.io/v1/"

// Credentials for one registry. Username "" with a Password means an
// identity (refresh) token, which BuildKit's authorizer accepts as such.
type Credentials struct {
	Username, Password string
}

// Config is a parsed docker config.json. It is not changed after loading,
// so it is safe for concurrent use; Credentials runs a helper on every
// call, because helpers may hand out short-lived tokens: callers cache.
type Config struct {
	filename    string                 // for error messages: where to fix things
	auths       map[string]Credentials // decoded, keyed as in the file
	credsStore  string
	credHelpers map[string]string
	env         map[string]Credentials // DOCKER_AUTH_CONFIG, which docker puts before everything
}

type fileJSON struct {
	Auths       map[string]authJSON `json:"auths"`
	CredsStore  string              `json:"credsStore"`
	CredHelpers map[string]string   `json:"credHelpers"`
}

type authJSON struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// Load reads $DOCKER_CONFIG/config.json, or ~/.docker/config.json when
// DOCKER_CONFIG is unset, plus DOCKER_AUTH_CONFIG, as docker does. A
// missing file is an empty Config, as for docker, since most machines that
// push anonymously or to kiln's own registry have never run docker login.
func Load() (*Config, error) {
	dir := os.Getenv("DOCKER_CONFIG")
	if dir == "" {
		home, err := homeDir()
		if err != nil {
			return nil, fmt.Errorf("locating the docker config: %w; set DOCKER_CONFIG to the directory holding config.json", err)
		}
		dir = filepath.Join(home, ".docker")
	}
	c, err := LoadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	if v := os.Getenv("DOCKER_AUTH_CONFIG"); v != "" {
		if c.env, err = parseEnv(v); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// LoadFile reads one config file and nothing else (not DOCKER_AUTH_CONFIG),
// for callers that were given a path. Errors name the file and the entry at
// fault but never quote the file, which holds secrets.
func LoadFile(path string) (*Config, error) {
	c := &Config{filename: path}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading docker config: %w", err)
	}
	var f fileJSON
	// A Decoder, as docker uses: an empty file is an empty config.
	if err := json.NewDecoder(bytes.NewReader(data)).Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("docker config %s: %s", path, describeJSONError(data, err))
	}
	c.credsStore = f.CredsStore
	c.credHelpers = f.CredHelpers
	c.auths = make(map[string]Credentials, len(f.Auths))
	for key, a := range f.Auths {
		cred, err := a.credentials()
		if err != nil {
			// Like docker, one bad entry spoils the file: docker itself
			// fails on it, so it is a mistake to fix, not to work around.
			return nil, fmt.Errorf("docker config %s: auths[%q]: %w", path, key, err)
		}
		c.auths[key] = cred
	}
	return c, nil
}

func (a authJSON) credentials() (Credentials, error) {
	user, pass := a.Username, a.Password
	if a.Auth != "" {
		var err error
		if user, pass, err = decodeAuth(a.Auth); err != nil {
			return Credentials{}, err
		}
	}
	// BuildKit's session auth provider sends an identity token in place of
	// the password, with no username, whatever else the entry holds.
	if a.IdentityToken != "" {
		return Credentials{Password: a.IdentityToken}, nil
	}
	return Credentials{Username: user, Password: pass}, nil
}

// decodeAuth is docker's: padded standard base64 of "user:password", the
// user not empty, NULs trimmed from the password. Its errors describe the
// value, never quote it.
func decodeAuth(s string) (user, pass string, err error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return "", "", errors.New(`"auth" is not valid base64; it should be base64("username:password")`)
	}
	user, pass, ok := strings.Cut(string(b), ":")
	if !ok || user == "" {
		return "", "", errors.New(`"auth" does not decode to "username:password"`)
	}
	return user, strings.Trim(pass, "\x00"), nil
}

// parseEnv is docker's DOCKER_AUTH_CONFIG: {"auths":{key:{"auth":...}}} and
// nothing more.
func parseEnv(v string) (map[string]Credentials, error) {
	var env struct {
		Auths map[string]struct {
			Auth string `json:"auth"`
		} `json:"auths"`
	}
	dec := json.NewDecoder(strings.NewReader(v))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf(`DOCKER_AUTH_CONFIG: %s; it should be {"auths":{"host":{"auth":"base64 of user:password"}}}`, describeJSONError([]byte(v), err))
	}
	if dec.More() {
		return nil, errors.New("DOCKER_AUTH_CONFIG: holds more than one JSON object")
	}
	out := make(map[string]Credentials, len(env.Auths))
	for key, a := range env.Auths {
		if a.Auth == "" {
			return nil, fmt.Errorf(`DOCKER_AUTH_CONFIG: auths[%q] has no "auth"`, key)
		}
		user, pass, err := decodeAuth(a.Auth)
		if err != nil {
			return nil, fmt.Errorf("DOCKER_AUTH_CONFIG: auths[%q]: %w", key, err)
		}
		out[key] = Credentials{Username: user, Password: pass}
	}
	return out, nil
}

// describeJSONError says where and what is wrong without quoting the input:
// encoding/json's messages quote the offending character or number, which
// may be part of a secret.
func describeJSONError(data []byte, err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		line, col := position(data, syn.Offset)
		return fmt.Sprintf("not valid JSON at line %d, column %d", line, col)
	case errors.As(err, &typ):
		want := "a string"
		if k := typ.Type.Kind(); k == reflect.Map || k == reflect.Struct {
			want = "an object"
		}
		if typ.Field == "" {
			return "not a JSON object"
		}
		line, col := position(data, typ.Offset)
		return fmt.Sprintf("%s at line %d, column %d must be %s", typ.Field, line, col, want)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "not valid JSON: it ends too early"
	case strings.Contains(err.Error(), "unknown field"):
		return "has a field docker does not accept there"
	default:
		return "not valid JSON"
	}
}

func position(data []byte, offset int64) (line, col int) {
	offset = min(max(offset, 0), int64(len(data)))
	before := data[:offset]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(offset) - (bytes.LastIndexByte(before, '\n') + 1)
	return line, max(col, 1)
}

func homeDir() (string, error) {
	if home, err := os.UserHomeDir(); err == nil && home != "" {
		return home, nil
	}
	u, err := user.Current()
	if err != nil || u.HomeDir == "" {
		return "", errors.New("no home directory ($HOME is not set)")
	}
	return u.HomeDir, nil
}

// Credentials returns the credentials for registry host (host[:port], as in
// an image reference; "docker.io" means Docker Hub, whose config key is
// "https://index.docker.io/v1/"). ok is false when the config has none for
// it, meaning: try anonymously.
//
// The order is docker's: DOCKER_AUTH_CONFIG, then credHelpers[host], then
// credsStore, then auths. Once a helper is chosen its answer is final, even
// "not found": docker never falls back to auths then, since with a helper
// configured auths entries are only placeholders. A credHelpers entry set
// to "" chooses auths over credsStore for that host, as in docker.
func (c *Config) Credentials(ctx context.Context, host string) (cred Credentials, ok bool, err error) {
	host = strings.TrimSpace(host)
	if strings.Contains(host, "/") {
		host = hostOf(host)
	}
	if host == "" {
		return Credentials{}, false, errors.New("dockerconfig: no registry host given")
	}
	if c == nil {
		return Credentials{}, false, nil
	}
	key := host
	if isHub(host) {
		key = hubKey
	}
	if cred, found := lookup(c.env, key); found {
		return cred, cred.Password != "", nil
	}
	helper, source := c.credsStore, `"credsStore"`
	if h, found := lookup(c.credHelpers, key); found {
		helper, source = h, fmt.Sprintf("credHelpers[%q]", key)
	}
	if helper != "" {
		return c.runHelper(ctx, helper, source, key)
	}
	cred, found := lookup(c.auths, key)
	if !found || cred.Password == "" {
		// An entry with no secret ("{}" is what docker leaves behind with a
		// helper) gives nothing to authenticate with.
		return Credentials{}, false, nil
	}
	return cred, true, nil
}

// lookup finds key exactly, as docker does, and failing that any entry
// whose key names the same registry, first in sorted order.
func lookup[V any](m map[string]V, key string) (V, bool) {
	if v, ok := m[key]; ok {
		return v, true
	}
	want := canonical(key)
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if canonical(k) == want {
			return m[k], true
		}
	}
	var zero V
	return zero, false
}

// canonical reduces any spelling of a registry ("https://Host:5000/v1/",
// "host:5000", the Hub's aliases) to one comparable string.
func canonical(key string) string {
	h := strings.ToLower(hostOf(key))
	if isHub(h) {
		return "docker.io"
	}
	return h
}

func isHub(host string) bool {
	switch strings.ToLower(host) {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return true
	}
	return false
}

// hostOf is docker's credentials.ConvertToHostname: "host[:port]" from a
// URL or a bare "host[:port][/path]".
func hostOf(s string) string {
	if _, rest, ok := strings.Cut(s, "://"); ok {
		if u, err := url.Parse(s); err == nil && u.Hostname() != "" {
			if u.Port() == "" {
				return u.Hostname()
			}
			return net.JoinHostPort(u.Hostname(), u.Port())
		}
		// url.Parse rejects unbracketed IPv6 hosts; take them as written.
		h, _, _ := strings.Cut(rest, "/")
		return h
	}
	h, _, _ := strings.Cut(s, "/")
	return h
}
