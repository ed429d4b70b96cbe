package dockerconfig

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
	"unicode/utf8"
)

// helperTimeout bounds one helper run: a helper waiting on a keychain
// prompt nobody will answer must not hang a build forever. A var for tests.
var helperTimeout = 30 * time.Second

// tokenUsername is how helpers mark an identity token (docker/cli's
// credentials.tokenUsername).
const tokenUsername = "<token>"

// runHelper speaks the docker-credential-helpers protocol: "get", the
// server URL on stdin, {"ServerURL","Username","Secret"} on stdout, or a
// non-zero exit with the error message on stdout. Stdout is never quoted
// in an error: on success it holds the secret, and a helper that fails
// half-way may have printed part of it.
func (c *Config) runHelper(ctx context.Context, helper, source, serverURL string) (Credentials, bool, error) {
	prog := "docker-credential-" + helper
	remove := fmt.Sprintf("remove %s from %s", source, c.filename)
	if strings.ContainsAny(helper, `/\`) || strings.TrimSpace(helper) != helper {
		return Credentials{}, false, fmt.Errorf("%s names %q, which is not a credential helper name: %s", source, helper, remove)
	}
	path, err := exec.LookPath(prog)
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return Credentials{}, false, notOnPath{fmt.Sprintf("%s not found on PATH: install it or %s", prog, remove)}
		}
		return Credentials{}, false, fmt.Errorf("cannot run %s: %w", prog, err)
	}

	runCtx, cancel := context.WithTimeout(ctx, helperTimeout)
	defer cancel()
	cmd := exec.CommandContext(runCtx, path, "get")
	cmd.Stdin = strings.NewReader(serverURL)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// A helper's own children may keep its pipes open after it is killed.
	cmd.WaitDelay = 2 * time.Second
	err = cmd.Run()

	what := fmt.Sprintf("%s get for %s", prog, serverURL)
	if ctx.Err() != nil {
		return Credentials{}, false, fmt.Errorf("%s: %w", what, ctx.Err())
	}
	if runCtx.Err() != nil {
		return Credentials{}, false, fmt.Errorf("%s did not answer within %s (is it waiting for a keychain to be unlocked?): unlock it, or %s", what, helperTimeout, remove)
	}
	if err != nil {
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			return Credentials{}, false, fmt.Errorf("%s: %w", what, err)
		}
		if notFound(stdout.String()) {
			return Credentials{}, false, nil
		}
		detail := ""
		if line := lastLine(stderr.String()); line != "" {
			detail = ": " + line
		}
		return Credentials{}, false, fmt.Errorf("%s failed (%s)%s; run `printf %s | %s get` to see its message, then fix the helper or %s",
			what, exit.ProcessState, detail, serverURL, prog, remove)
	}

	var out struct{ Username, Secret string }
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return Credentials{}, false, fmt.Errorf(`%s printed something other than the {"Username","Secret"} JSON docker expects: fix the helper or %s`, what, remove)
	}
	if out.Secret == "" {
		return Credentials{}, false, nil
	}
	if out.Username == tokenUsername {
		return Credentials{Password: out.Secret}, true, nil
	}
	return Credentials{Username: out.Username, Password: out.Secret}, true, nil
}

// notFound recognises docker-credential-helpers' "credentials not found in
// native keychain", and other helpers' variations on it.
func notFound(stdout string) bool {
	return strings.Contains(strings.ToLower(stdout), "credentials not found")
}

// lastLine is the end of a helper's stderr, where its diagnosis usually
// is, bounded so that a chatty helper does not bury the advice after it.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	line := strings.TrimSpace(lines[len(lines)-1])
	const limit = 200
	if len(line) > limit {
		cut := limit
		for cut > 0 && !utf8.RuneStart(line[cut]) {
			cut--
		}
		line = line[:cut] + "…"
	}
	return line
}

// notOnPath is exec.ErrNotFound, for errors.Is, said for people.
type notOnPath struct{ msg string }

func (e notOnPath) Error() string { return e.msg }
func (e notOnPath) Unwrap() error { return exec.ErrNotFound }
