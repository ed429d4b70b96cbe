package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/kiln-build/kiln/api"
)

// ociDescriptor is the image manifest's descriptor, as buildx puts it in
// containerimage.descriptor.
type ociDescriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

// writeResultFiles writes --iidfile and --metadata-file for a succeeded
// build. What kiln's registry cannot tell (the manifest's descriptor) is
// left out with a warning on warn rather than failing a build that
// succeeded.
func writeResultFiles(ctx context.Context, c *client, form *buildForm, b *api.Build, warn io.Writer) error {
	if form.iidFile == "" && form.metadataFile == "" {
		return nil
	}
	digest := str(b.ImageDigest)
	if digest == "" {
		return fmt.Errorf("build %s succeeded but the server named no image digest to write", b.Id)
	}
	if form.iidFile != "" {
		// As buildx: the digest, no newline.
		if err := os.WriteFile(form.iidFile, []byte(digest), 0o644); err != nil {
			return fmt.Errorf("write --iidfile: %w", err)
		}
	}
	if form.metadataFile == "" {
		return nil
	}
	md := map[string]any{
		"containerimage.digest": digest,
		"kiln.build.id":         b.Id,
	}
	desc, config, err := c.manifestDescriptor(ctx, resultRepos(b), digest)
	if err != nil {
		fmt.Fprintf(warn, "kiln: warning: containerimage.descriptor left out of %s: %v\n", form.metadataFile, err)
	} else {
		md["containerimage.descriptor"] = desc
		if config != "" {
			md["containerimage.config.digest"] = config
		}
	}
	if names := c.imageNames(ctx, b); len(names) > 0 {
		md["image.name"] = strings.Join(names, ",")
	}
	out, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(form.metadataFile, out, 0o644); err != nil {
		return fmt.Errorf("write --metadata-file: %w", err)
	}
	return nil
}

// splitName splits repository[:tag] (no host) into its repository and tag.
func splitName(name string) (repo, tag string) {
	i := strings.LastIndexByte(name, ':')
	if i < 0 || strings.ContainsRune(name[i+1:], '/') {
		return name, ""
	}
	return name[:i], name[i+1:]
}

// resultRepos lists the repositories the build's image can be read from:
// the names it was given, then its canonical builds/<id>.
func resultRepos(b *api.Build) []string {
	var repos []string
	for _, n := range append(append([]string{}, b.Tags...), b.Image) {
		if n == "" {
			continue
		}
		r, _ := splitName(n)
		if !strings.Contains(r, "@") && !slices.Contains(repos, r) {
			repos = append(repos, r)
		}
	}
	return repos
}

// imageNames are the full names (host/repository:tag) the build's image
// was pushed as: its tags, or its canonical name when it has none. The
// server's images endpoint says how its registry is reached; if it cannot
// be asked, the address the client uses stands in for the host.
func (c *client) imageNames(ctx context.Context, b *api.Build) []string {
	names := b.Tags
	if len(names) == 0 && b.Image != "" {
		names = []string{b.Image}
	}
	var out []string
	for _, n := range names {
		full := c.registryHost() + "/" + n
		if r, err := c.api.GetImageWithResponse(ctx, n); err == nil && r.JSON200 != nil && r.JSON200.Reference != nil && *r.JSON200.Reference != "" {
			full = *r.JSON200.Reference
		}
		out = append(out, full)
	}
	if b.Pushed != nil {
		out = append(out, *b.Pushed...)
	}
	return out
}

// registryHost is the host[:port] of the server the client talks to,
// whose /v2/ is kiln's registry.
func (c *client) registryHost() string {
	u, err := url.Parse(c.base)
	if err != nil {
		return c.base
	}
	return u.Host
}

// maxManifest bounds a manifest read; registries refuse larger ones.
const maxManifest = 4 << 20

// manifestMediaTypes are what the manifest request accepts.
var manifestMediaTypes = []string{
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.oci.image.index.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
	"application/vnd.docker.distribution.manifest.list.v2+json",
}

// manifestDescriptor reads the manifest of digest from kiln's registry,
// trying repos in turn, and returns its descriptor and, for an image
// manifest, its config's digest.
func (c *client) manifestDescriptor(ctx context.Context, repos []string, digest string) (ociDescriptor, string, error) {
	if len(repos) == 0 {
		return ociDescriptor{}, "", errors.New("the build names no image")
	}
	var firstErr error
	for _, repo := range repos {
		d, cfg, err := c.fetchManifest(ctx, repo, digest)
		if err == nil {
			return d, cfg, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return ociDescriptor{}, "", firstErr
}

func (c *client) fetchManifest(ctx context.Context, repo, digest string) (ociDescriptor, string, error) {
	body, contentType, err := c.readManifest(ctx, repo, digest)
	if err != nil {
		return ociDescriptor{}, "", err
	}
	what := fmt.Sprintf("manifest %s@%s", repo, digest)
	var m struct {
		MediaType string `json:"mediaType"`
		Config    struct {
			Digest string `json:"digest"`
		} `json:"config"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return ociDescriptor{}, "", fmt.Errorf("%s: not JSON: %w", what, err)
	}
	mediaType := m.MediaType
	if mediaType == "" {
		mediaType, _, _ = strings.Cut(contentType, ";")
	}
	return ociDescriptor{MediaType: mediaType, Digest: digest, Size: int64(len(body))}, m.Config.Digest, nil
}

// readManifest reads repo@digest from kiln's registry, checked against
// its digest, and returns it with the Content-Type it was served as.
func (c *client) readManifest(ctx context.Context, repo, digest string) ([]byte, string, error) {
	u, err := url.Parse(c.base)
	if err != nil {
		return nil, "", err
	}
	what := fmt.Sprintf("manifest %s@%s", repo, digest)
	target := u.Scheme + "://" + u.Host + "/v2/" + repo + "/manifests/" + digest
	resp, err := c.registryGet(ctx, target)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return nil, "", fmt.Errorf("%s: registry answered %d: %s", what, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifest+1))
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", what, err)
	}
	if len(body) > maxManifest {
		return nil, "", fmt.Errorf("%s: larger than %s", what, humanSize(maxManifest))
	}
	if algo, hexSum, ok := strings.Cut(digest, ":"); ok && algo == "sha256" {
		sum := sha256.Sum256(body)
		if hex.EncodeToString(sum[:]) != hexSum {
			return nil, "", fmt.Errorf("%s: the registry's manifest does not match its digest", what)
		}
	}
	return body, resp.Header.Get("Content-Type"), nil
}

// registryGet GETs a registry URL, answering the registry's Bearer
// challenge with a registry token exchanged for the client's kiln token,
// as docker login does. The kiln token goes only to a token endpoint on
// the host the client already talks to.
func (c *client) registryGet(ctx context.Context, target string) (*http.Response, error) {
	get := func(auth string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", strings.Join(manifestMediaTypes, ", "))
		req.Header.Set("User-Agent", "kiln-cli")
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		return c.http.Do(req)
	}
	resp, err := get("")
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	scheme, params := parseChallenge(resp.Header.Get("WWW-Authenticate"))
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if !strings.EqualFold(scheme, "bearer") || params["realm"] == "" {
		return nil, fmt.Errorf("the registry wants %q authentication, which the client does not speak", scheme)
	}
	tok, err := c.registryToken(ctx, target, params)
	if err != nil {
		return nil, err
	}
	return get("Bearer " + tok)
}

// registryToken exchanges the kiln token at the challenge's realm.
func (c *client) registryToken(ctx context.Context, target string, params map[string]string) (string, error) {
	realm, err := url.Parse(params["realm"])
	if err != nil {
		return "", fmt.Errorf("registry token realm %q: %w", params["realm"], err)
	}
	t, _ := url.Parse(target)
	if realm.Host != t.Host || (realm.Scheme != "http" && realm.Scheme != "https") {
		return "", fmt.Errorf("the registry sends for a token to %s, not to the kiln server %s; not sending the kiln token there", realm.Redacted(), t.Host)
	}
	q := realm.Query()
	if v := params["service"]; v != "" {
		q.Set("service", v)
	}
	if v := params["scope"]; v != "" {
		q.Set("scope", v)
	}
	realm.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, realm.String(), nil)
	if err != nil {
		return "", err
	}
	c.authorize(req)
	resp, err := c.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("registry token: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("registry token: server answered %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(body, &tr); err != nil {
		return "", fmt.Errorf("registry token: unreadable answer: %w", err)
	}
	if tr.Token != "" {
		return tr.Token, nil
	}
	if tr.AccessToken != "" {
		return tr.AccessToken, nil
	}
	return "", errors.New("registry token: the answer holds no token")
}

// parseChallenge reads `Bearer realm="...",service="...",scope="..."`.
func parseChallenge(h string) (scheme string, params map[string]string) {
	params = map[string]string{}
	scheme, rest, _ := strings.Cut(strings.TrimSpace(h), " ")
	for rest = strings.TrimSpace(rest); rest != ""; {
		key, after, ok := strings.Cut(rest, "=")
		if !ok {
			break
		}
		key = strings.ToLower(strings.TrimSpace(key))
		var val string
		if strings.HasPrefix(after, `"`) {
			// A quoted string, with backslash escapes.
			var b strings.Builder
			i := 1
			for ; i < len(after); i++ {
				ch := after[i]
				if ch == '\\' && i+1 < len(after) {
					i++
					b.WriteByte(after[i])
					continue
				}
				if ch == '"' {
					break
				}
				b.WriteByte(ch)
			}
			val = b.String()
			after = after[min(i+1, len(after)):]
		} else {
			val, after, _ = strings.Cut(after, ",")
			after = "," + after
		}
		params[key] = strings.TrimSpace(val)
		after = strings.TrimSpace(after)
		after = strings.TrimPrefix(after, ",")
		rest = strings.TrimSpace(after)
	}
	return scheme, params
}
