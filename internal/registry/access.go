package registry

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	dauth "github.com/distribution/distribution/v3/registry/auth"

	"github.com/kiln-build/kiln/internal/auth"
)

// accessControllerName is the name kiln's controller is registered under
// in distribution's auth registry.
const accessControllerName = "kiln"

// Option keys of the access controller.
const (
	optAuthority = "authority"
	optService   = "service"
	optTokenPath = "tokenpath"
)

func init() {
	if err := dauth.Register(accessControllerName, newAccessController); err != nil {
		panic(fmt.Sprintf("register %q registry access controller: %v", accessControllerName, err))
	}
}

// accessController admits requests bearing a registry token from the
// Authority that covers every access the request needs.
type accessController struct {
	authority *auth.Authority
	service   string
	tokenPath string
}

func newAccessController(options map[string]any) (dauth.AccessController, error) {
	a, ok := options[optAuthority].(*auth.Authority)
	if !ok || a == nil {
		return nil, fmt.Errorf("kiln access controller: option %q must be a *auth.Authority, got %T", optAuthority, options[optAuthority])
	}
	service, _ := options[optService].(string)
	tokenPath, _ := options[optTokenPath].(string)
	if service == "" || !strings.HasPrefix(tokenPath, "/") {
		return nil, fmt.Errorf("kiln access controller: need a service name and an absolute token path, got %q and %q", service, tokenPath)
	}
	return &accessController{authority: a, service: service, tokenPath: tokenPath}, nil
}

// errNoToken: a request without a bearer token.
var errNoToken = errors.New("authorization token required")

// verify checks r's bearer token: issued by kiln for this registry, and
// current. What it grants is the caller's to check.
func (ac *accessController) verify(r *http.Request) (auth.RegistryGrant, error) {
	scheme, raw, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || raw == "" || !strings.EqualFold(scheme, "bearer") {
		return auth.RegistryGrant{}, errNoToken
	}
	return ac.authority.VerifyRegistryToken(strings.TrimSpace(raw), ac.service)
}

func (ac *accessController) Authorized(r *http.Request, wanted ...dauth.Access) (*dauth.Grant, error) {
	ch := challenge{service: ac.service, tokenPath: ac.tokenPath, scope: scopeParam(wanted)}

	g, err := ac.verify(r)
	if errors.Is(err, errNoToken) {
		ch.err = err
		return nil, ch
	}
	if err != nil {
		ch.err, ch.code = err, "invalid_token"
		return nil, ch
	}
	for _, w := range wanted {
		if !g.Allows(w.Type, w.Name, w.Action) {
			ch.err, ch.code = fmt.Errorf("token for %q does not allow %s on %s %s", g.Subject, w.Action, w.Type, w.Name), "insufficient_scope"
			return nil, ch
		}
	}
	resources := make([]dauth.Resource, 0, len(g.Access))
	for _, a := range g.Access {
		resources = append(resources, dauth.Resource{Type: a.Type, Name: a.Name})
	}
	return &dauth.Grant{User: dauth.UserInfo{Name: g.Subject}, Resources: resources}, nil
}

// challenge is the 401 answer. Its realm is built per request from the Host
// the client used, so the token endpoint is found whatever address or name
// kiln is reached by.
type challenge struct {
	err       error
	code      string // RFC 6750 error code, if any
	service   string
	tokenPath string
	scope     string
}

func (c challenge) Error() string { return c.err.Error() }

func (c challenge) SetHeaders(r *http.Request, w http.ResponseWriter) {
	v := fmt.Sprintf("Bearer realm=%q,service=%q", realmFor(r, c.tokenPath), c.service)
	if c.scope != "" {
		v += fmt.Sprintf(",scope=%q", c.scope)
	}
	if c.code != "" {
		v += fmt.Sprintf(",error=%q", c.code)
	}
	w.Header().Set("WWW-Authenticate", v)
}

func realmFor(r *http.Request, tokenPath string) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	// A TLS-terminating proxy in front of kiln says so here; trusting it
	// only changes the realm this same client is told to use.
	if p := r.Header.Get("X-Forwarded-Proto"); p == "http" || p == "https" {
		scheme = p
	}
	return scheme + "://" + r.Host + tokenPath
}

// scopeParam renders the wanted accesses as a scope parameter, one entry
// per resource with its actions merged ("repository:app:pull,push").
func scopeParam(wanted []dauth.Access) string {
	var order []dauth.Resource
	actions := map[dauth.Resource][]string{}
	for _, w := range wanted {
		res := dauth.Resource{Type: w.Type, Name: w.Name}
		if _, seen := actions[res]; !seen {
			order = append(order, res)
		}
		if !slices.Contains(actions[res], w.Action) {
			actions[res] = append(actions[res], w.Action)
		}
	}
	parts := make([]string, len(order))
	for i, res := range order {
		parts[i] = res.Type + ":" + res.Name + ":" + strings.Join(actions[res], ",")
	}
	return strings.Join(parts, " ")
}
