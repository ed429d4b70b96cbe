package mirror

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Manifest media types kiln can mirror.
const (
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerSchema1  = "application/vnd.docker.distribution.manifest.v1+json"
	mediaTypeSchema1Signed  = "application/vnd.docker.distribution.manifest.v1+prettyjws"
)

var manifestAccept = strings.Join([]string{
	v1.MediaTypeImageIndex, v1.MediaTypeImageManifest, mediaTypeDockerList, mediaTypeDockerManifest,
}, ", ")

// maxManifestBytes bounds a manifest read from upstream; it is buffered.
const maxManifestBytes = 4 << 20

// upstream talks to one registry host and caches its auth.
type upstream struct {
	host   string // as in references, e.g. docker.io
	base   string // scheme://host[:port] contacted
	creds  *Credentials
	client *http.Client

	mu     sync.Mutex
	basic  bool                   // the registry asked for Basic auth
	tokens map[string]cachedToken // by repository path
}

type cachedToken struct {
	token   string
	expires time.Time
}

// challenge is one parsed WWW-Authenticate challenge.
type challenge struct {
	scheme string // lowercase: "bearer", "basic"
	params map[string]string
}

// statusError is an upstream answer that is not worth retrying.
type statusError struct {
	err error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

// resolveTag asks the upstream registry which manifest digest repo:tag
// points at. HEAD is tried first: Docker Hub does not count it against the
// pull rate limit.
func (u *upstream) resolveTag(ctx context.Context, repo, tag string) (digest.Digest, error) {
	path := "/v2/" + repo + "/manifests/" + tag
	resp, err := u.do(ctx, http.MethodHead, repo, path, manifestAccept)
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		if d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
			return d, nil
		}
	case http.StatusNotFound, http.StatusUnauthorized, http.StatusForbidden, http.StatusTooManyRequests:
		return "", u.statusErr(resp, repo, fmt.Sprintf("tag %q", tag))
	}
	// No digest header, no HEAD support or a server error: a GET digests
	// the body itself, or at least carries the registry's error message.
	_, _, d, err := u.getManifest(ctx, repo, tag)
	return d, err
}

// getManifest fetches manifest ref (tag or digest) and returns its body,
// media type and digest. A digest ref is verified against the body.
func (u *upstream) getManifest(ctx context.Context, repo, ref string) (body []byte, mediaType string, d digest.Digest, err error) {
	resp, err := u.do(ctx, http.MethodGet, repo, "/v2/"+repo+"/manifests/"+ref, manifestAccept)
	if err != nil {
		return nil, "", "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		what := "manifest " + ref
		if _, err := digest.Parse(ref); err != nil {
			what = fmt.Sprintf("tag %q", ref)
		}
		return nil, "", "", u.statusErr(resp, repo, what)
	}
	body, err = io.ReadAll(io.LimitReader(resp.Body, maxManifestBytes+1))
	if err != nil {
		return nil, "", "", fmt.Errorf("read manifest %s: %w", ref, netHint(err, u))
	}
	if len(body) > maxManifestBytes {
		return nil, "", "", &statusError{fmt.Errorf("manifest %s is over %d bytes; refusing it", ref, maxManifestBytes)}
	}
	actual := digest.FromBytes(body)
	if want, err := digest.Parse(ref); err == nil {
		if want.Algorithm() != digest.SHA256 {
			actual = want.Algorithm().FromBytes(body)
		}
		if actual != want {
			return nil, "", "", &statusError{fmt.Errorf("manifest %s: %w: %s sent content with digest %s", ref, ErrDigestMismatch, u.host, actual)}
		}
		d = want
	} else {
		d = actual
		if h, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil && h.Algorithm() == digest.SHA256 && h != actual {
			return nil, "", "", &statusError{fmt.Errorf("manifest %s: %w: %s says %s, the content is %s", ref, ErrDigestMismatch, u.host, h, actual)}
		}
	}
	mediaType, err = manifestMediaType(resp.Header.Get("Content-Type"), body)
	if err != nil {
		return nil, "", "", &statusError{fmt.Errorf("manifest %s: %w", ref, err)}
	}
	return body, mediaType, d, nil
}

// manifestMediaType decides a manifest's type from the response's
// Content-Type, falling back to the mediaType field of the body for
// registries that answer with a generic type.
func manifestMediaType(contentType string, body []byte) (string, error) {
	ct, _, _ := mime.ParseMediaType(contentType)
	var probe struct {
		SchemaVersion int    `json:"schemaVersion"`
		MediaType     string `json:"mediaType"`
		Manifests     []any  `json:"manifests"`
		Config        any    `json:"config"`
	}
	_ = json.Unmarshal(body, &probe)
	mt := ct
	switch mt {
	case v1.MediaTypeImageIndex, v1.MediaTypeImageManifest, mediaTypeDockerList, mediaTypeDockerManifest:
	default:
		mt = probe.MediaType
		if mt == "" && probe.SchemaVersion == 2 {
			if probe.Manifests != nil {
				mt = v1.MediaTypeImageIndex
			} else if probe.Config != nil {
				mt = v1.MediaTypeImageManifest
			}
		}
	}
	switch mt {
	case v1.MediaTypeImageIndex, v1.MediaTypeImageManifest, mediaTypeDockerList, mediaTypeDockerManifest:
		return mt, nil
	case mediaTypeDockerSchema1, mediaTypeSchema1Signed:
		return "", errors.New("it is a Docker schema 1 manifest, which kiln does not mirror: push the image again with a current Docker or BuildKit")
	}
	if probe.SchemaVersion == 1 {
		return "", errors.New("it is a Docker schema 1 manifest, which kiln does not mirror: push the image again with a current Docker or BuildKit")
	}
	return "", fmt.Errorf("unsupported manifest media type %q (want an OCI or Docker v2 image manifest or index)", mt)
}

// openBlob starts downloading blob d of repo. The caller closes the body.
func (u *upstream) openBlob(ctx context.Context, repo string, d digest.Digest) (io.ReadCloser, error) {
	resp, err := u.do(ctx, http.MethodGet, repo, "/v2/"+repo+"/blobs/"+d.String(), "")
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, u.statusErr(resp, repo, "blob "+d.String())
	}
	return resp.Body, nil
}

// do sends one request with whatever auth the registry asks for. On a 401
// it answers the challenge (fetching a token for Bearer) and retries once;
// a second 401 is reported with a hint about credentials. Other statuses
// are returned for the caller to interpret.
func (u *upstream) do(ctx context.Context, method, repo, path, accept string) (*http.Response, error) {
	send := func() (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, method, u.base+path, nil)
		if err != nil {
			return nil, fmt.Errorf("build request for %s: %w", u.host, err)
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		req.Header.Set("User-Agent", "kiln-mirror")
		u.authorize(req, repo)
		resp, err := u.client.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, netHint(err, u)
		}
		return resp, nil
	}
	resp, err := send()
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	chs := parseChallenges(resp.Header.Values("WWW-Authenticate"))
	drain(resp)
	if err := u.answer(ctx, repo, chs); err != nil {
		return nil, err
	}
	resp, err = send()
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	defer drain(resp)
	return nil, u.unauthorized(repo, registryMessage(resp))
}

// authorize adds what earlier challenges taught us to req.
func (u *upstream) authorize(req *http.Request, repo string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if t, ok := u.tokens[repo]; ok && time.Now().Before(t.expires) {
		req.Header.Set("Authorization", "Bearer "+t.token)
		return
	}
	if u.basic && u.creds != nil && u.creds.Username != "" {
		req.SetBasicAuth(u.creds.Username, u.creds.Password)
	}
}

// answer prepares auth for the challenges of a 401, preferring Bearer.
func (u *upstream) answer(ctx context.Context, repo string, chs []challenge) error {
	for _, c := range chs {
		if c.scheme == "bearer" {
			return u.fetchToken(ctx, repo, c)
		}
	}
	for _, c := range chs {
		if c.scheme == "basic" {
			if u.creds == nil {
				return u.unauthorized(repo, "")
			}
			if u.creds.Username == "" {
				return &statusError{fmt.Errorf("%s: %w: it asks for a username and password (HTTP Basic), but only a token is configured in %s; set username and password there", u.host, ErrUnauthorized, CredentialsConfigKey)}
			}
			u.mu.Lock()
			u.basic = true
			u.mu.Unlock()
			return nil
		}
	}
	return u.unauthorized(repo, "")
}

// fetchToken gets a Bearer token for pulling repo at the challenge's
// realm (Docker registry token spec), with the configured credentials or
// anonymously.
func (u *upstream) fetchToken(ctx context.Context, repo string, c challenge) error {
	realm, err := url.Parse(c.params["realm"])
	if err != nil || (realm.Scheme != "https" && realm.Scheme != "http") || realm.Host == "" {
		return &statusError{fmt.Errorf("%s: its auth challenge names no usable token realm (%q)", u.host, c.params["realm"])}
	}
	// Credentials travel to the realm only as securely as to the registry.
	if u.creds != nil && realm.Scheme == "http" && strings.HasPrefix(u.base, "https://") {
		return &statusError{fmt.Errorf("%s: its token realm %s is plain HTTP; refusing to send the configured credentials there", u.host, realm.Redacted())}
	}
	scope := c.params["scope"]
	if scope == "" {
		scope = "repository:" + repo + ":pull"
	}
	service := c.params["service"]

	var req *http.Request
	if u.creds != nil && u.creds.Token != "" {
		form := url.Values{
			"grant_type":    {"refresh_token"},
			"refresh_token": {u.creds.Token},
			"client_id":     {"kiln"},
			"scope":         {scope},
		}
		if service != "" {
			form.Set("service", service)
		}
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, realm.String(), strings.NewReader(form.Encode()))
		if err != nil {
			return fmt.Errorf("build token request for %s: %w", u.host, err)
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	} else {
		q := realm.Query()
		if service != "" {
			q.Set("service", service)
		}
		q.Add("scope", scope)
		realm.RawQuery = q.Encode()
		req, err = http.NewRequestWithContext(ctx, http.MethodGet, realm.String(), nil)
		if err != nil {
			return fmt.Errorf("build token request for %s: %w", u.host, err)
		}
		if u.creds != nil {
			req.SetBasicAuth(u.creds.Username, u.creds.Password)
		}
	}
	req.Header.Set("User-Agent", "kiln-mirror")
	resp, err := u.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("get a pull token for %s from %s: %w", repo, realm.Host, netHint(err, u))
	}
	defer drain(resp)
	switch {
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return u.unauthorized(repo, registryMessage(resp))
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("get a pull token for %s from %s: %s %s", repo, realm.Host, resp.Status, registryMessage(resp))
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&tr); err != nil {
		return fmt.Errorf("get a pull token for %s from %s: decode answer: %w", repo, realm.Host, err)
	}
	tok := tr.AccessToken
	if tok == "" {
		tok = tr.Token
	}
	if tok == "" {
		return fmt.Errorf("get a pull token for %s from %s: the answer holds no token", repo, realm.Host)
	}
	// The spec's default lifetime is 60s; renew a little early so a token
	// does not expire between check and use.
	life := time.Duration(tr.ExpiresIn) * time.Second
	if life < time.Minute {
		life = time.Minute
	}
	u.mu.Lock()
	u.tokens[repo] = cachedToken{token: tok, expires: time.Now().Add(life - 10*time.Second)}
	u.mu.Unlock()
	return nil
}

// unauthorized builds the 401 error, with a hint that depends on whether
// credentials were configured. Docker Hub answers 401 for repositories
// that do not exist, so that is mentioned too.
func (u *upstream) unauthorized(repo, detail string) error {
	if detail != "" {
		detail = " (" + detail + ")"
	}
	if u.creds == nil {
		return &statusError{fmt.Errorf("%w: %s requires authentication for %s%s; the image may be private or may not exist. Set credentials for %q in the server config key %s",
			ErrUnauthorized, u.host, repo, detail, u.host, CredentialsConfigKey)}
	}
	return &statusError{fmt.Errorf("%w: %s rejected the credentials configured for %q in %s, or they lack pull access to %s%s; check them, and that the image exists",
		ErrUnauthorized, u.host, u.host, CredentialsConfigKey, repo, detail)}
}

// statusErr turns a non-2xx answer about what (e.g. `tag "22"`) into an
// error that says what to do.
func (u *upstream) statusErr(resp *http.Response, repo, what string) error {
	msg := ""
	if resp.Request.Method != http.MethodHead {
		if m := registryMessage(resp); m != "" {
			msg = " (" + m + ")"
		}
	}
	switch resp.StatusCode {
	case http.StatusNotFound:
		return &statusError{fmt.Errorf("%w: %s has no %s in %s%s; check the image name and tag", ErrNotFound, u.host, what, repo, msg)}
	case http.StatusUnauthorized:
		return u.unauthorized(repo, strings.TrimSuffix(strings.TrimPrefix(msg, " ("), ")"))
	case http.StatusForbidden:
		return &statusError{fmt.Errorf("%w: %s forbids access to %s of %s%s; check the credentials for %q in %s", ErrUnauthorized, u.host, what, repo, msg, u.host, CredentialsConfigKey)}
	case http.StatusTooManyRequests:
		return fmt.Errorf("%s rate-limited kiln fetching %s of %s%s; retry later, or set credentials for %q in %s to raise the limit", u.host, what, repo, msg, u.host, CredentialsConfigKey)
	}
	err := fmt.Errorf("%s answered %s fetching %s of %s%s", u.host, resp.Status, what, repo, msg)
	if resp.StatusCode >= 500 {
		return err
	}
	return &statusError{err}
}

// registryMessage extracts the human part of a registry error body
// ({"errors":[{"code","message"}]} or a token server's {"details"}). Only
// the registry's own words are kept; nothing of the request is echoed.
func registryMessage(resp *http.Response) string {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
	var body struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
		Details string `json:"details"`
		Message string `json:"message"`
	}
	if json.Unmarshal(b, &body) != nil {
		return ""
	}
	var parts []string
	for _, e := range body.Errors {
		parts = append(parts, strings.TrimSpace(e.Code+" "+e.Message))
	}
	for _, s := range []string{body.Details, body.Message} {
		if s != "" {
			parts = append(parts, s)
		}
	}
	msg := strings.Join(parts, "; ")
	if len(msg) > 300 {
		msg = msg[:300] + "…"
	}
	return msg
}

func (u *upstream) describe() string {
	if strings.TrimPrefix(strings.TrimPrefix(u.base, "https://"), "http://") == u.host {
		return "upstream registry " + u.host
	}
	return fmt.Sprintf("upstream registry %s (at %s)", u.host, u.base)
}

// netHint turns a transport error into one that says what to do.
func netHint(err error, u *upstream) error {
	var dns *net.DNSError
	if errors.As(err, &dns) && dns.IsNotFound {
		return &statusError{fmt.Errorf("registry host %q not found (DNS: %s); check the image reference, or the server's DNS settings", dns.Name, dns.Err)}
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	if errors.As(err, &certErr) || errors.As(err, &unknownAuth) {
		return &statusError{fmt.Errorf("the TLS certificate of %s is not trusted; install its CA on the server: %w", u.describe(), err)}
	}
	if strings.Contains(err.Error(), "server gave HTTP response to HTTPS client") {
		return &statusError{fmt.Errorf("%s speaks plain HTTP; list it under mirror.insecure if that is intended: %w", u.describe(), err)}
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return fmt.Errorf("cannot connect to %s: %w", u.describe(), opErr.Err)
	}
	return fmt.Errorf("request to %s failed: %w", u.describe(), err)
}

// parseChallenges parses WWW-Authenticate values such as
// Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull".
func parseChallenges(values []string) []challenge {
	var out []challenge
	for _, v := range values {
		s := strings.TrimSpace(v)
		for s != "" {
			var scheme string
			scheme, s = cutToken(s)
			if scheme == "" {
				break
			}
			c := challenge{scheme: strings.ToLower(scheme), params: map[string]string{}}
			s = strings.TrimLeft(s, " ")
			for s != "" {
				key, rest := cutToken(s)
				rest = strings.TrimLeft(rest, " ")
				if key == "" || !strings.HasPrefix(rest, "=") {
					break // next challenge's scheme
				}
				rest = strings.TrimLeft(rest[1:], " ")
				var val string
				if strings.HasPrefix(rest, `"`) {
					val, rest = cutQuoted(rest)
				} else {
					val, rest = cutToken(rest)
				}
				c.params[strings.ToLower(key)] = val
				s = strings.TrimLeft(rest, " ")
				if strings.HasPrefix(s, ",") {
					s = strings.TrimLeft(s[1:], " ")
				}
			}
			out = append(out, c)
		}
	}
	return out
}

func cutToken(s string) (tok, rest string) {
	i := strings.IndexFunc(s, func(r rune) bool { return r == ' ' || r == '=' || r == ',' || r == '"' })
	if i < 0 {
		return s, ""
	}
	return s[:i], s[i:]
}

func cutQuoted(s string) (val, rest string) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if i+1 < len(s) {
				i++
				b.WriteByte(s[i])
			}
		case '"':
			return b.String(), s[i+1:]
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String(), ""
}

// drain lets the connection be reused.
func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}
