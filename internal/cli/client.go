package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/kiln-build/kiln/api"
)

// client talks to one kiln server.
type client struct {
	base        string // scheme://host[:port][/prefix], no trailing slash
	token       string
	tokenSource string // where the token came from, for error hints; "" if none
	context     string // the context in use, "default" for none
	http        *http.Client
	api         *api.ClientWithResponses
}

// apiError is an error answer of the API. Its message is the server's
// `error` field, which is written for the user.
type apiError struct {
	Status  int
	Code    string
	Message string
}

func (e *apiError) Error() string { return e.Message }

func newClient(addr, token, tokenSource string) (*client, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("invalid server address %q: use http://host:port or https://host:port (--addr or KILN_ADDR)", addr)
	}
	c := &client{
		base:        strings.TrimRight(u.String(), "/"),
		token:       token,
		tokenSource: tokenSource,
		// No client-wide timeout: uploads and event streams last as long as
		// the build; every call is bounded by its context instead.
		http: &http.Client{},
	}
	c.api, err = api.NewClientWithResponses(c.base,
		api.WithHTTPClient(c.http),
		api.WithRequestEditorFn(func(_ context.Context, r *http.Request) error {
			c.authorize(r)
			return nil
		}))
	if err != nil {
		return nil, fmt.Errorf("set up API client for %s: %w", c.base, err)
	}
	return c, nil
}

func (c *client) authorize(r *http.Request) {
	if c.token != "" {
		r.Header.Set("Authorization", "Bearer "+c.token)
	}
	r.Header.Set("User-Agent", "kiln-cli")
}

// url joins an API path (already escaped) to the base address.
func (c *client) url(path string) string { return c.base + path }

// transportError explains a request that got no HTTP answer at all.
func (c *client) transportError(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return fmt.Errorf("%s: cannot reach kiln at %s: %v (is the server running? set --addr or KILN_ADDR)", what, c.base, op.Err)
	}
	return fmt.Errorf("%s: request to kiln at %s failed: %w", what, c.base, err)
}

// responseError turns a non-2xx answer into an *apiError carrying the
// server's message, or a description of the status when the body is not
// the API's error object (a proxy's 502 page, say).
func (c *client) responseError(status int, body []byte) error {
	e := &apiError{Status: status}
	var ae api.Error
	if json.Unmarshal(body, &ae) == nil && ae.Error != "" {
		e.Message = ae.Error
		if ae.Code != nil {
			e.Code = *ae.Code
		}
	} else {
		text := strings.TrimSpace(string(body))
		if len(text) > 200 {
			text = text[:200] + "…"
		}
		e.Message = fmt.Sprintf("server answered %d %s", status, http.StatusText(status))
		if text != "" {
			e.Message += ": " + text
		}
	}
	if status == http.StatusUnauthorized {
		if c.tokenSource == "" {
			if c.context != "" && c.context != defaultContext {
				e.Message += " (no token given: context " + c.context + " has no token file; pass --token, set KILN_TOKEN, or recreate the context with --token-file)"
			} else {
				e.Message += " (no token given: pass --token, set KILN_TOKEN, use a context with a token file (kiln context create), or run from the directory holding " + adminTokenRel + ")"
			}
		} else {
			e.Message += " (token from " + c.tokenSource + ")"
		}
	}
	return e
}

// check returns nil for a 2xx answer and the API error otherwise.
func (c *client) check(resp *http.Response, body []byte) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	return c.responseError(resp.StatusCode, body)
}

// readError reads a failed response's body (bounded) into an API error.
func (c *client) readError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return c.responseError(resp.StatusCode, body)
}

// getBuild fetches one build.
func (c *client) getBuild(ctx context.Context, id string) (*api.Build, error) {
	r, err := c.api.GetBuildWithResponse(ctx, id)
	if err != nil {
		return nil, c.transportError(ctx, "get build "+id, err)
	}
	if err := c.check(r.HTTPResponse, r.Body); err != nil {
		return nil, err
	}
	if r.JSON200 == nil {
		return nil, fmt.Errorf("get build %s: server answered %d without a build object", id, r.StatusCode())
	}
	return r.JSON200, nil
}

// cancelBuild asks the server to cancel a build. finished is true when the
// build had already ended (409); b is then its final state.
func (c *client) cancelBuild(ctx context.Context, id string) (b *api.Build, finished bool, err error) {
	r, err := c.api.CancelBuildWithResponse(ctx, id)
	if err != nil {
		return nil, false, c.transportError(ctx, "cancel build "+id, err)
	}
	switch {
	case r.JSON200 != nil:
		return r.JSON200, false, nil
	case r.JSON409 != nil:
		return r.JSON409, true, nil
	}
	if err := c.check(r.HTTPResponse, r.Body); err != nil {
		return nil, false, err
	}
	return nil, false, fmt.Errorf("cancel build %s: server answered %d without a build object", id, r.StatusCode())
}

func terminal(s api.BuildStatus) bool {
	return s == api.BuildStatusSucceeded || s == api.BuildStatusFailed || s == api.BuildStatusCanceled
}
