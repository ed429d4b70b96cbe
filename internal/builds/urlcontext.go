package builds

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/egress"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/store"
	"golang.org/x/net/http/httpproxy"
)

// HTTP(S) contexts (kiln build https://host/ctx.tar.gz, --build-context
// NAME=https://...) are downloaded by the server at submission, under
// the build's network policy and the operator's context.url_allowed, and
// received like an upload: a tar (plain, gzip, zstd) becomes the
// context, anything else is a single file (the Dockerfile, for the main
// context). So they are pinned by content hash, deduplicate, and work on
// every runtime; a URL that cannot be fetched is a 400 at once.

const (
	// urlFetchTimeout bounds one download, headers to last byte.
	urlFetchTimeout = 5 * time.Minute
	// urlHeaderTimeout bounds the wait for the server's answer.
	urlHeaderTimeout = 30 * time.Second
	// maxURLFile bounds a downloaded file that is not an archive.
	maxURLFile = 1 << 20
)

// fetched is what a URL held: a context directory received from a tar,
// or a single file.
type fetched struct {
	info *buildcontext.Info // set for an archive, received into dir
	file []byte             // set otherwise
	name string             // the file's name, from the URL path
}

// fetchURL downloads rawURL and receives it into dir when it is an
// archive. The URL's host must be allowed by the operator and by the
// build's network policy; redirects are checked the same way.
func (s *Service) fetchURL(ctx context.Context, rawURL, dir, field string, o *store.BuildOptions) (fetched, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fetched{}, badRequest("%s: %s is not an http(s) URL", field, errdefs.Quote(rawURL))
	}
	check := func(u *url.URL) error {
		if err := s.checkFetch(u.Hostname(), field, o); err != nil {
			return err
		}
		if !registryAllowed(u.Host, s.cfg.URLContextsAllowed) {
			return forbidden("%s: this server does not download contexts from %s (context.url_allowed: %s); hosts on the server's own networks must be listed by host:port", field, u.Host, strings.Join(s.cfg.URLContextsAllowed, ", "))
		}
		return nil
	}
	if err := check(u); err != nil {
		return fetched{}, err
	}
	client := &http.Client{
		Timeout: urlFetchTimeout,
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           s.fetchDialer(),
			ResponseHeaderTimeout: urlHeaderTimeout,
			TLSHandshakeTimeout:   30 * time.Second,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 5 {
				return errors.New("more than 5 redirects")
			}
			return check(req.URL)
		},
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return fetched{}, badRequest("%s: %v", field, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fetched{}, ctx.Err()
		}
		var de *errdefs.Error
		if errors.As(err, &de) {
			var dial *net.OpError
			if errors.As(err, &dial) {
				// A host allowed by a wildcard resolved to a private address.
				return fetched{}, forbidden("%s: downloading %s: %v", field, u.Redacted(), dial)
			}
			return fetched{}, de // a redirect to where the build may not go
		}
		return fetched{}, badRequest("%s: downloading %s failed: %v; check the URL and that the kiln server can reach it", field, u.Redacted(), unwrapURLError(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fetched{}, badRequest("%s: %s answered %s; check the URL", field, u.Redacted(), resp.Status)
	}
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	head, _ := br.Peek(512)
	if isArchive(head) {
		info, err := buildcontext.Receive(ctx, br, dir, s.cfg.Context)
		if err != nil {
			return fetched{}, err
		}
		return fetched{info: &info}, nil
	}
	data, err := io.ReadAll(io.LimitReader(br, maxURLFile+1))
	if err != nil {
		return fetched{}, badRequest("%s: downloading %s failed: %v", field, u.Redacted(), err)
	}
	if len(data) > maxURLFile {
		return fetched{}, badRequest("%s: %s is neither a tar (plain, gzip or zstd) nor a file of at most 1 MiB", field, u.Redacted())
	}
	name := path.Base(u.Path)
	if name == "." || name == "/" || name == "" {
		name = "index"
	}
	return fetched{file: data, name: name}, nil
}

// unwrapURLError drops net/http's "Get \"URL\": " prefix, which would
// repeat the URL (and any credentials in it).
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// isArchive tells a tar, gzip or zstd stream by its first bytes.
func isArchive(head []byte) bool {
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}), bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return true
	case len(head) >= 262 && string(head[257:262]) == "ustar":
		return true
	}
	return false
}

// receiveFile receives a single file as a context directory holding it.
func (s *Service) receiveFile(ctx context.Context, dir, name string, data []byte) (buildcontext.Info, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	if name != "" {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return buildcontext.Info{}, err
		}
		if _, err := tw.Write(data); err != nil {
			return buildcontext.Info{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return buildcontext.Info{}, err
	}
	return buildcontext.Receive(ctx, &b, dir, s.cfg.Context)
}

// receiveURLContext makes an http(s) URL the build's context: a tar is
// the context; another file is the Dockerfile of an empty context, as
// docker build does.
func (s *Service) receiveURLContext(ctx context.Context, u *Upload, req *Request) error {
	var o store.BuildOptions
	if err := s.validateNetwork(req, &o); err != nil {
		return err
	}
	f, err := s.fetchURL(ctx, req.ContextURL, u.dir, "context_url", &o)
	if err != nil {
		return err
	}
	u.source = "downloaded from " + redactURL(req.ContextURL)
	if f.info != nil {
		u.context = f.info
		return nil
	}
	if req.Dockerfile != "" || req.DockerfilePath != "" {
		return badRequest("context_url %s is a single file, not a tar, so it is the Dockerfile of an empty context; drop -f (the dockerfile and dockerfile_path fields)", errdefs.Quote(redactURL(req.ContextURL)))
	}
	info, err := s.receiveFile(ctx, u.dir, "", nil)
	if err != nil {
		return err
	}
	u.context = &info
	req.Dockerfile = string(f.file)
	return nil
}

// namedURL makes an http(s) URL a named context: a tar becomes the
// directory, another file a directory holding it under its URL name.
func (s *Service) namedURL(ctx context.Context, u *Upload, name, src string, o *store.BuildOptions) (store.NamedContext, error) {
	field := "build context " + name
	dir, err := u.nextNamedDir()
	if err != nil {
		return store.NamedContext{}, err
	}
	f, err := s.fetchURL(ctx, src, dir, field, o)
	if err != nil {
		return store.NamedContext{}, err
	}
	if f.info == nil {
		info, err := s.receiveFile(ctx, dir, filepath.Base(f.name), f.file)
		if err != nil {
			return store.NamedContext{}, err
		}
		f.info = &info
	}
	return u.addNamed(name, dir, *f.info), nil
}

// isHTTPContext tells an http(s) URL of a tarball or file from a git URL
// (one whose path ends in .git), as docker does.
func isHTTPContext(s string) bool {
	return (strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://")) && !looksLikeGit(s)
}

// redactURL hides a URL's password, for messages.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "the URL"
	}
	return u.Redacted()
}

// fetchDialer dials for URL context downloads: a host the operator listed
// in context.url_allowed as it resolves, any other (allowed by a
// wildcard) only at public addresses, checked on the address dialed. A
// proxy from the environment is the operator's and is dialed as is.
func (s *Service) fetchDialer() func(ctx context.Context, network, addr string) (net.Conn, error) {
	proxies := map[string]bool{}
	env := httpproxy.FromEnvironment()
	for _, p := range []string{env.HTTPProxy, env.HTTPSProxy} {
		if u, err := url.Parse(p); err == nil && u.Host != "" {
			port := u.Port()
			if port == "" {
				port = map[string]string{"https": "443"}[u.Scheme]
			}
			if port == "" {
				port = "80"
			}
			proxies[strings.ToLower(net.JoinHostPort(u.Hostname(), port))] = true
		}
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := net.Dialer{Timeout: 30 * time.Second}
		if !proxies[strings.ToLower(addr)] && !egress.Listed(addr, s.cfg.URLContextsAllowed) {
			d.Control = egress.PublicOnly
		}
		return d.DialContext(ctx, network, addr)
	}
}
