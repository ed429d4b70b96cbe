package solve

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	bkerrdefs "github.com/moby/buildkit/solver/errdefs"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/moby/buildkit/client"
	gateway "github.com/moby/buildkit/frontend/gateway/client"
	"github.com/moby/buildkit/frontend/subrequests/lint"
	"github.com/moby/buildkit/identity"
	"github.com/moby/buildkit/session"
	"github.com/moby/buildkit/session/secrets/secretsprovider"
	"github.com/tonistiigi/fsutil"

	"github.com/kiln-build/kiln/internal/progress"
)

// cancelGrace bounds how long Run waits for BuildKit to acknowledge a
// canceled context before returning anyway; callers waiting on a cancel
// must not hang on a slow daemon.
const cancelGrace = 3 * time.Second

// Run solves req's Dockerfile on the buildkitd behind c, pushes the image to
// every name in req.Push and reports progress to sink while it runs.
//
// A Request without Push names still builds (useful to warm a cache) but
// produces no Digest.
func Run(ctx context.Context, c *client.Client, req Request, sink progress.Sink) (Result, error) {
	if sink == nil {
		sink = progress.Discard
	}
	opt, err := solveOpt(req)
	if err != nil {
		return Result{}, err
	}
	red := newRedactor(req.Secrets)
	tr := newTracker(sink, red)

	statusCh := make(chan *client.SolveStatus)
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		// Keep draining after Run gave up on a canceled solve: the client
		// blocks on this channel until its status stream ends.
		for s := range statusCh {
			tr.handle(s)
		}
	}()

	type outcome struct {
		resp *client.SolveResponse
		err  error
	}
	done := make(chan outcome, 1)
	var check *Check
	go func() {
		if req.Call == CallCheck {
			resp, chk, err := runCheck(ctx, c, opt, statusCh)
			check = chk
			done <- outcome{resp, err}
			return
		}
		resp, err := c.Solve(ctx, nil, opt, statusCh)
		done <- outcome{resp, err}
	}()

	var out outcome
	select {
	case out = <-done:
		<-drained
	case <-ctx.Done():
		select {
		case out = <-done:
			<-drained
		case <-time.After(cancelGrace):
			tr.stop()
			return tr.result(), fmt.Errorf("build canceled: %w", ctx.Err())
		}
	}
	tr.stop()

	// A solve that completed despite a late cancel is reported as the
	// success it was: its image is already pushed.
	res := tr.result()
	if out.err != nil {
		if ctx.Err() != nil {
			return res, fmt.Errorf("build canceled: %w", ctx.Err())
		}
		// BuildKit's text already says what went wrong ("dockerfile parse
		// error on line 2: …"); only its generic prefix is noise. Before
		// it, as buildx shows it: the failing step's last log lines and
		// the Dockerfile lines it came from.
		msg := strings.TrimPrefix(red.apply(out.err.Error()), "failed to solve: ")
		msg = tr.recap() + red.apply(sourceExcerpt(out.err)) + msg
		return res, fmt.Errorf("build failed: %w", redactedError{msg, out.err})
	}
	if req.Call == CallCheck {
		res.Check = check
		return res, nil
	}
	if out.resp != nil {
		res.Digest = out.resp.ExporterResponse["containerimage.digest"]
	}
	if len(req.Push) > 0 && res.Digest == "" {
		return res, errors.New("build finished but the image exporter reported no digest; the push may not have happened")
	}
	return res, nil
}

// solveOpt translates a Request into BuildKit's SolveOpt.
func solveOpt(req Request) (client.SolveOpt, error) {
	if req.ContextDir == "" && req.ContextURL == "" {
		return client.SolveOpt{}, errors.New("solve request: context dir is empty")
	}
	dockerfileDir := req.DockerfileDir
	if dockerfileDir == "" {
		dockerfileDir = req.ContextDir
	}
	dockerfileName := req.DockerfileName
	if dockerfileName == "" {
		dockerfileName = "Dockerfile"
	}
	if filepath.IsAbs(dockerfileName) || strings.HasPrefix(filepath.Clean(dockerfileName), "..") {
		return client.SolveOpt{}, fmt.Errorf("solve request: dockerfile name %q must be a path inside the dockerfile dir", dockerfileName)
	}
	attrs := map[string]string{"filename": dockerfileName}
	locals := map[string]fsutil.FS{}
	if req.ContextURL != "" {
		// dockerfile.v0 fetches a git context itself (BuildKit's git
		// source) and reads the Dockerfile from it, unless dockerfilekey
		// points it at a local one.
		if !strings.Contains(req.ContextURL, "#") {
			return client.SolveOpt{}, fmt.Errorf("solve request: context URL %q is not pinned to a commit", req.ContextURL)
		}
		attrs["context"] = req.ContextURL
		if req.InlineDockerfile {
			if req.DockerfileDir == "" {
				return client.SolveOpt{}, errors.New("solve request: an inline Dockerfile with a context URL needs its dockerfile dir")
			}
			dockerfileFS, err := fsutil.NewFS(req.DockerfileDir)
			if err != nil {
				return client.SolveOpt{}, fmt.Errorf("solve request: open dockerfile dir %s: %w", req.DockerfileDir, err)
			}
			locals["dockerfile"] = dockerfileFS
			attrs["dockerfilekey"] = "dockerfile"
		}
	} else {
		contextFS, err := fsutil.NewFS(req.ContextDir)
		if err != nil {
			return client.SolveOpt{}, fmt.Errorf("solve request: open build context %s: %w", req.ContextDir, err)
		}
		dockerfileFS, err := fsutil.NewFS(dockerfileDir)
		if err != nil {
			return client.SolveOpt{}, fmt.Errorf("solve request: open dockerfile dir %s: %w", dockerfileDir, err)
		}
		locals["context"], locals["dockerfile"] = contextFS, dockerfileFS
	}
	if req.Target != "" {
		attrs["target"] = req.Target
	}
	if len(req.Platforms) > 0 {
		attrs["platform"] = strings.Join(req.Platforms, ",")
	}
	for k, v := range req.Labels {
		attrs["label:"+k] = v
	}
	if len(req.AddHosts) > 0 {
		attrs["add-hosts"] = strings.Join(req.AddHosts, ",")
	}
	if req.ShmSize > 0 {
		attrs["shm-size"] = strconv.FormatInt(req.ShmSize, 10)
	}
	if len(req.Ulimits) > 0 {
		attrs["ulimit"] = strings.Join(req.Ulimits, ",")
	}
	for k, v := range req.BuildArgs {
		if k == "" {
			return client.SolveOpt{}, errors.New("solve request: build arg with empty name")
		}
		attrs["build-arg:"+k] = v
	}
	if req.NoCache {
		// An empty value means "every stage", which is what --no-cache means.
		attrs["no-cache"] = ""
	}
	if req.Pull {
		attrs["image-resolve-mode"] = "pull"
	}
	for typ, v := range req.Attests {
		if typ != "provenance" && typ != "sbom" {
			return client.SolveOpt{}, fmt.Errorf("solve request: attestation type %q is not provenance or sbom", typ)
		}
		attrs["attest:"+typ] = v
	}
	for name, src := range req.NamedContexts {
		if name == "" || src == "" {
			return client.SolveOpt{}, fmt.Errorf("solve request: named context %q → %q: name and source must both be set", name, src)
		}
		attrs["context:"+name] = src
	}
	// Local named contexts travel as BuildKit locals of their own; the
	// frontend reads each one's .dockerignore itself.
	for i, name := range slices.Sorted(maps.Keys(req.LocalContexts)) {
		if _, dup := req.NamedContexts[name]; dup || name == "" {
			return client.SolveOpt{}, fmt.Errorf("solve request: named context %q is given twice or has no name", name)
		}
		fs, err := fsutil.NewFS(req.LocalContexts[name])
		if err != nil {
			return client.SolveOpt{}, fmt.Errorf("solve request: open named context %s: %w", name, err)
		}
		local := "named-context-" + strconv.Itoa(i)
		locals[local] = fs
		attrs["context:"+name] = "local:" + local
	}

	key := req.ContextKey
	if key == "" {
		key = identity.NewID()
	}
	opt := client.SolveOpt{
		AllowedEntitlements: slices.Clone(req.Entitlements),
		SharedKey:           key,
		Frontend:            "dockerfile.v0",
		FrontendAttrs:       attrs,
		LocalMounts:         locals,
		Session: []session.Attachable{
			secretsprovider.FromMap(req.Secrets),
			newMemoryAuth(req.RegistryAuth),
			newSSHAgents(req.SSH, req.SSHAgent),
		},
	}
	if len(req.Push) > 0 {
		for _, name := range req.Push {
			if name == "" || strings.Contains(name, ",") {
				return client.SolveOpt{}, fmt.Errorf("solve request: invalid push name %q", name)
			}
		}
		// Plain-HTTP registries (kiln's own on loopback) are configured on
		// the daemon per host, so the exporter needs no insecure flag that
		// would also weaken TLS for every other name.
		exp := map[string]string{
			"name": strings.Join(req.Push, ","),
			"push": "true",
		}
		for k, v := range req.Annotations {
			exp["annotation."+k] = v
		}
		opt.Exports = []client.ExportEntry{{Type: client.ExporterImage, Attrs: exp}}
	}
	for _, ref := range req.CacheImports {
		opt.CacheImports = append(opt.CacheImports, client.CacheOptionsEntry{
			Type:  "registry",
			Attrs: map[string]string{"ref": ref},
		})
	}
	if req.CacheExport != "" {
		mode := req.CacheExportMode
		switch mode {
		case "":
			mode = "max"
		case "min", "max":
		default:
			return client.SolveOpt{}, fmt.Errorf("solve request: cache export mode %q is not min or max", mode)
		}
		opt.CacheExports = []client.CacheOptionsEntry{{
			Type:  "registry",
			Attrs: map[string]string{"ref": req.CacheExport, "mode": mode},
		}}
	}
	return opt, nil
}

// runCheck runs the Dockerfile frontend's lint subrequest (docker build
// --check) instead of a build: the checks run, nothing is built or pushed.
func runCheck(ctx context.Context, c *client.Client, opt client.SolveOpt, statusCh chan *client.SolveStatus) (*client.SolveResponse, *Check, error) {
	attrs := opt.FrontendAttrs
	attrs["requestid"] = lint.RequestLint
	opt.Frontend, opt.FrontendAttrs = "", nil
	opt.Exports, opt.CacheExports = nil, nil
	var check *Check
	resp, err := c.Build(ctx, opt, "kiln", func(ctx context.Context, gw gateway.Client) (*gateway.Result, error) {
		res, err := gw.Solve(ctx, gateway.SolveRequest{Frontend: "dockerfile.v0", FrontendOpt: attrs})
		if err != nil {
			return nil, err
		}
		var results lint.LintResults
		if err := json.Unmarshal(res.Metadata["result.json"], &results); err != nil {
			return nil, fmt.Errorf("read the Dockerfile check's result: %w", err)
		}
		var report bytes.Buffer
		if err := results.PrintTo(&report, nil); err != nil {
			return nil, fmt.Errorf("print the Dockerfile check's result: %w", err)
		}
		if results.Error != nil {
			results.PrintErrorTo(&report, nil)
		}
		check = &Check{Warnings: len(results.Warnings), Report: strings.TrimLeft(report.String(), "\n")}
		if results.Error != nil {
			check.Error = results.Error.Message
		}
		return gateway.NewResult(), nil
	}, statusCh)
	return resp, check, err
}

// redactedError keeps the original error chain for errors.Is/As while its
// message has secret values masked.
type redactedError struct {
	msg string
	err error
}

func (e redactedError) Error() string { return e.msg }
func (e redactedError) Unwrap() error { return e.err }

// sourceExcerpt renders the Dockerfile lines BuildKit says an error came
// from ("Dockerfile:3", the lines with the failing one marked), or "".
func sourceExcerpt(err error) string {
	var b strings.Builder
	for _, src := range bkerrdefs.Sources(err) {
		if src.Info == nil {
			continue
		}
		var ex strings.Builder
		if src.Print(&ex) == nil && ex.Len() > 0 {
			b.WriteString(ex.String())
		}
	}
	return b.String()
}
