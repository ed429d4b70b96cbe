package auth

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// maxTokenRequestBody bounds the OAuth2 form a client may POST.
const maxTokenRequestBody = 64 << 10

// TokenHandler serves the Docker registry token endpoint for service.
//
// A client authenticates with a kiln token, either as the password of HTTP
// Basic auth (any username) or as a Bearer token, and names the wanted
// access in repeated "scope" query parameters (GET). The OAuth2 form
// (POST, grant_type=password, the kiln token as password) is accepted too,
// because containerd and BuildKit try it first when they hold credentials.
// The answer carries a registry token granting what grant allows of the
// requested scopes; anything not allowed is silently left out.
func (a *Authority) TokenHandler(service string, grant GrantFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.serveToken(w, r, service, grant)
	})
}

func (a *Authority) serveToken(w http.ResponseWriter, r *http.Request, service string, grant GrantFunc) {
	var (
		kilnToken   string
		reqService  string
		scopeParams []string
	)
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		q := r.URL.Query()
		reqService, scopeParams = q.Get("service"), q["scope"]
		kilnToken = credentialFromHeader(r)
	case http.MethodPost:
		r.Body = http.MaxBytesReader(w, r.Body, maxTokenRequestBody)
		if err := r.ParseForm(); err != nil {
			writeTokenError(w, http.StatusBadRequest, "DENIED", fmt.Sprintf("read token request form: %v", err))
			return
		}
		reqService = r.PostForm.Get("service")
		scopeParams = r.PostForm["scope"]
		switch gt := r.PostForm.Get("grant_type"); gt {
		case "password":
			kilnToken = r.PostForm.Get("password")
		case "refresh_token":
			// kiln never hands out refresh tokens, but a client configured
			// with an identity token sends it here; that is a kiln token.
			kilnToken = r.PostForm.Get("refresh_token")
		case "":
			kilnToken = credentialFromHeader(r)
		default:
			writeTokenError(w, http.StatusBadRequest, "UNSUPPORTED", fmt.Sprintf("grant_type %q is not supported: use password (with a kiln token as the password) or GET with HTTP Basic auth", gt))
			return
		}
		if kilnToken == "" {
			kilnToken = credentialFromHeader(r)
		}
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		writeTokenError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", fmt.Sprintf("method %s is not allowed on the token endpoint: use GET or POST", r.Method))
		return
	}

	if reqService != "" && reqService != service {
		writeTokenError(w, http.StatusBadRequest, "DENIED", fmt.Sprintf("unknown service %q: this endpoint issues tokens for %q", reqService, service))
		return
	}
	if kilnToken == "" {
		w.Header().Set("WWW-Authenticate", `Basic realm="kiln"`)
		writeTokenError(w, http.StatusUnauthorized, "UNAUTHORIZED", "no kiln token given: log in with any username and a kiln token as the password (create one with `kiln token create`)")
		return
	}
	p, err := a.Verify(kilnToken)
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Basic realm="kiln"`)
		writeTokenError(w, http.StatusUnauthorized, "UNAUTHORIZED", err.Error())
		return
	}
	requested, err := ParseRegistryScopes(scopeParams)
	if err != nil {
		writeTokenError(w, http.StatusBadRequest, "DENIED", err.Error())
		return
	}
	rt, err := a.IssueRegistryToken(p, service, grant(r.Context(), p, requested))
	if err != nil {
		status := http.StatusBadRequest
		if errors.Is(err, ErrExpired) {
			status = http.StatusUnauthorized
		}
		writeTokenError(w, status, "DENIED", err.Error())
		return
	}

	granted := make([]string, len(rt.Access))
	for i, g := range rt.Access {
		granted[i] = g.String()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
		IssuedAt    string `json:"issued_at"`
		Scope       string `json:"scope,omitempty"`
	}{
		Token:       rt.Token,
		AccessToken: rt.Token,
		ExpiresIn:   int(rt.ExpiresAt.Sub(rt.IssuedAt) / time.Second),
		IssuedAt:    rt.IssuedAt.UTC().Format(time.RFC3339),
		Scope:       strings.Join(granted, " "),
	})
}

// credentialFromHeader returns the kiln token from Basic (as the password)
// or Bearer authorization, or "" if there is none.
func credentialFromHeader(r *http.Request) string {
	if _, pass, ok := r.BasicAuth(); ok {
		return pass
	}
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if ok && strings.EqualFold(scheme, "bearer") {
		return strings.TrimSpace(tok)
	}
	return ""
}

// writeTokenError answers in the registry's error format so docker,
// containerd and skopeo show the message to the user.
func writeTokenError(w http.ResponseWriter, status int, code, msg string) {
	type item struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Errors []item `json:"errors"`
	}{[]item{{Code: code, Message: msg}}})
}
