package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/dockerconfig"
)

// buildFlags are the flags of `kiln build`.
type buildFlags struct {
	tags           []string
	file           string
	buildArgs      []string
	target         string
	platforms      []string
	noCache        bool
	pull           bool
	secrets        []string
	ssh            []string
	cacheScope     string
	globalCacheKey string
	globalCache    bool
	progress       string
	cpus           int
	memoryMB       int
	diskGB         int
	timeout        string
	network        string
	allowDomains   []string
	outputs        []string
	labels         []string
	annotations    []string
	addHosts       []string
	shmSize        string
	ulimits        []string
	load           bool
	contextUpload  string
	quiet          bool
	iidFile        string
	metadataFile   string
	detach         bool
	push           bool
	call           string
	check          bool
	allow          []string
	buildContexts  []string
	cacheFrom      []string
	cacheTo        []string
	attest         []string
	provenance     string
	sbom           string
}

// buildForm is a validated build request, ready to upload.
type buildForm struct {
	fields  []formField // non-file fields, in the order they are sent
	secrets []secret
	dir     string // the context directory
	// dockerfile is what buildcontext.PackOptions.Dockerfile gets: the
	// Dockerfile's path so Pack always includes it, or an absolute path
	// outside the context, which Pack ignores.
	dockerfile string
	// outputs are where the result goes besides kiln's registry.
	outputs []*output
	// contextUpload is how the context travels: contextUploadAuto,
	// contextUploadManifest or contextUploadTar.
	contextUpload string
	// quiet (-q): the image digest alone on stdout at the end.
	quiet bool
	// iidFile and metadataFile, if set, receive the image digest and
	// buildx's metadata JSON once the build succeeded.
	iidFile, metadataFile string
	// detach: print the build id and return once the build is submitted.
	detach bool
	// kind is the context's kind (contextDir, contextStdin, ...). Only a
	// directory is packed by kiln; raw is sent as it is, and a git URL
	// travels in the context_url field with no context part.
	kind string
	raw  *rawContext
	// registryRefs are the names and caches on registries, whose hosts
	// may need the user's docker credentials (registryAuth, memory-only).
	registryRefs []string
	registryAuth map[string]dockerconfig.Credentials
	// namedDirs are --build-context NAME=DIR entries, sent as tars.
	namedDirs []namedDir
	// check: the build runs the Dockerfile's checks only (--call check).
	check bool
	// sshAgents are the --ssh agents forwarded through the build's ssh
	// session (id → socket); sshKeys the key files sent with it.
	sshAgents map[string]string
	sshKeys   []secret
}

type namedDir struct{ name, dir string }

// hasTag reports whether the user gave name as a tag, with or without
// the :latest a name without a tag means.
func (f *buildForm) hasTag(name string) bool {
	for _, fl := range f.fields {
		if fl.name == "tags" && (fl.value == name || fl.value+":latest" == name) {
			return true
		}
	}
	return false
}

type formField struct{ name, value string }

// secret is a secret's id and value. The value lives only in memory and is
// never formatted into output, logs or errors.
type secret struct {
	id    string
	value []byte
}

func buildCommand(g *globals) *cobra.Command {
	var f buildFlags
	c := &cobra.Command{
		Use:   "build [flags] CONTEXT|-|TAR|GIT-URL|URL",
		Short: "Build an image from a context directory and a Dockerfile",
		Long: `Build an image on the kiln server.

CONTEXT is a directory; its files (honouring its .dockerignore) go to the
server and are built with BuildKit. Only files the server does not have yet
are sent: kiln hashes the context, remembering the hashes of unchanged files
in ~/.cache/kiln (or $XDG_CACHE_HOME/kiln), and asks the server which
contents it lacks. --context-upload=tar sends the whole context instead. The Dockerfile is CONTEXT/Dockerfile
unless -f names another; a Dockerfile outside CONTEXT (or -f -, stdin) is
sent inline.

As with docker buildx, CONTEXT may also be:
  -        standard input: a Dockerfile (the build has an empty context),
           or a tar, tar.gz or tar.zst of the context (told apart by its
           first bytes)
  TAR      a tar, tar.gz or tar.zst file, sent as it is
  GIT-URL  https://host/org/repo.git#ref:subdir, git@host:org/repo.git:
           never fetched by kiln build; the server pins the ref to a commit
           and fetches that commit's tree (network egress only)
  URL      https://host/ctx.tar.gz: a tar (plain, gzip or zstd) the server
           downloads as the context; a URL of another file is the
           Dockerfile of an empty context
With a tar, git or URL context, -f names the Dockerfile inside it.

Progress follows the build until it ends, on standard error as with docker
buildx; standard output carries only what was asked for: the image digest
with -q, a tar with -o -, the build id with --detach. --iidfile and
--metadata-file write the digest and buildx's metadata JSON
(containerimage.digest, containerimage.descriptor, image.name, plus
kiln.build.id).

Ctrl-C, SIGTERM and SIGHUP cancel the build on the server, and so does a
failed write to standard output or error (a reader that went away, as in
kiln build . 2>&1 | head -1), unless --detach. The exit status is 0 only if
the build succeeded, 1 if it failed or was refused (or its output could not
be written), 2 for a usage error and 130 if interrupted.`,
		Example: `  kiln build -t myapp:1.0 .
  kiln build -f docker/Dockerfile --build-arg VERSION=1.2 --target prod .
  kiln build --secret id=npm,src=$HOME/.npmrc --secret id=token,env=GH_TOKEN .
  kiln build --ssh default .                       # RUN --mount=type=ssh uses your ssh-agent
  kiln build --ssh deploy=$HOME/.ssh/deploy_key .  # …,id=deploy gets that key (sent like a secret)
  kiln build --target artifacts -o dist .          # the result's files into ./dist
  kiln build --platform linux/amd64,linux/arm64 -t app:1 .  # one multi-platform index
  kiln build -o type=docker,dest=app.tar -t app:1 .  # an image tarball for docker load
  ID=$(kiln build -q .)                            # the image digest
  kiln build --metadata-file meta.json -t app:1 .
  kiln build --detach .                            # prints the build id, does not wait
  kiln build - < Dockerfile                        # no context
  kiln build - < ctx.tar.gz                        # the context from stdin
  kiln build https://github.com/org/repo.git#v1.2:app`,
		Args: exactArgs("CONTEXT"),
	}
	fl := c.Flags()
	fl.StringArrayVarP(&f.tags, "tag", "t", nil, "image name (repo[:tag]) to push the result to; repeatable")
	fl.StringVarP(&f.file, "file", "f", "", `Dockerfile path, relative to the current directory (default "CONTEXT/Dockerfile"); "-" reads it from stdin`)
	fl.StringArrayVar(&f.buildArgs, "build-arg", nil, "build argument NAME=VALUE; NAME alone takes the value from the environment (skipped if unset); repeatable")
	fl.StringVar(&f.target, "target", "", "Dockerfile stage to build")
	fl.StringArrayVar(&f.platforms, "platform", nil, "platforms to build for, os/arch[/variant], comma-separated or repeated (linux/amd64,linux/arm64): several give one multi-platform image index; foreign ones run emulated (default $DOCKER_DEFAULT_PLATFORM, else the builder's own)")
	fl.BoolVar(&f.noCache, "no-cache", false, "do not use the build cache")
	fl.BoolVar(&f.pull, "pull", false, "always fetch base images again")
	fl.StringArrayVar(&f.secrets, "secret", nil, "secret for RUN --mount=type=secret: id=ID,src=FILE or id=ID,env=VAR; repeatable; the value is sent, never printed")
	fl.StringArrayVar(&f.ssh, "ssh", nil, "ssh agent for RUN --mount=type=ssh: default|ID[=SOCKET|KEYFILE[,KEYFILE]] (no path: $SSH_AUTH_SOCK); an agent is forwarded while the build runs and keeps its keys, key files are sent like secrets; repeatable")
	fl.StringVar(&f.cacheScope, "cache-scope", "", "cache scope to build in; must equal your token's cache scope")
	fl.StringVar(&f.globalCacheKey, "global-cache-key", "", "also import the shared global cache cache/global/KEY (read-only)")
	fl.BoolVar(&f.globalCache, "global-cache", false, "export to the global cache under --global-cache-key (needs build:admin)")
	fl.StringVar(&f.progress, "progress", progressAuto, "progress output on stderr: auto, tty, plain, quiet, rawjson (BuildKit's SolveStatus stream, as buildx prints it) or json (kiln's events, one per line)")
	fl.BoolVarP(&f.quiet, "quiet", "q", false, "print nothing but the image digest, on stdout, once the build succeeded")
	fl.StringVar(&f.iidFile, "iidfile", "", "write the image digest to FILE")
	fl.StringVar(&f.metadataFile, "metadata-file", "", "write the build result metadata to FILE as JSON (buildx's keys)")
	fl.BoolVar(&f.detach, "detach", false, "submit the build, print its id on stdout and return without following it")
	fl.IntVar(&f.cpus, "cpus", 0, "CPUs for the builder (default: the server's)")
	fl.IntVar(&f.memoryMB, "memory", 0, "memory for the builder in MB (default: the server's)")
	fl.IntVar(&f.diskGB, "disk", 0, "disk for the builder in GB (default: the server's)")
	fl.StringVar(&f.timeout, "timeout", "", "build time limit in seconds, or a duration like 30m (default: the server's)")
	fl.StringVar(&f.network, "network", "", "network for RUN steps: egress (internet, the default) or isolated (only kiln's registry); the server decides which are allowed")
	fl.StringArrayVar(&f.allowDomains, "allow-domain", nil, "with egress: allow only these domains (example.com, *.example.com) through a filtering proxy; repeatable")
	fl.StringArrayVar(&f.labels, "label", nil, "set an image label KEY=VALUE; repeatable")
	fl.StringArrayVar(&f.annotations, "annotation", nil, "add an annotation KEY=VALUE to the image manifest; repeatable")
	fl.StringArrayVar(&f.addHosts, "add-host", nil, "add HOST:IP to /etc/hosts of RUN steps; repeatable")
	fl.StringVar(&f.shmSize, "shm-size", "", "size of /dev/shm for RUN steps, e.g. 128m")
	fl.StringArrayVar(&f.ulimits, "ulimit", nil, "ulimit for RUN steps, NAME=SOFT[:HARD] (e.g. nofile=1024:2048); repeatable")
	fl.BoolVar(&f.push, "push", false, "also push names on other registries (-t registry.example.com/app:1) there, with the credentials of your docker config (~/.docker/config.json, credential helpers); the result is always in kiln's registry")
	fl.StringVar(&f.call, "call", "build", "what to run: build, or check (the Dockerfile's checks, as docker build --check: warnings on stdout, exit status 1 if there are any; nothing is built)")
	fl.BoolVar(&f.check, "check", false, "shorthand for --call check")
	fl.StringArrayVar(&f.allow, "allow", nil, "grant an insecure entitlement to RUN steps: network.host or security.insecure; the server refuses those its operator does not allow; repeatable")
	fl.StringArrayVar(&f.buildContexts, "build-context", nil, "a named context for FROM NAME or COPY --from=NAME: NAME=DIR (sent with its own .dockerignore), NAME=docker-image://REF, NAME=GIT-URL or NAME=https://URL; repeatable")
	fl.StringArrayVar(&f.cacheFrom, "cache-from", nil, "import a registry cache: type=registry,ref=NAME or NAME (kiln's registry, or another with your docker credentials); repeatable")
	fl.StringArrayVar(&f.cacheTo, "cache-to", nil, "export the build cache to a registry: type=registry,ref=NAME[,mode=min|max]")
	fl.StringArrayVar(&f.attest, "attest", nil, "attestation as buildx takes it: type=provenance[,mode=min|max] or type=sbom[,generator=IMAGE]; repeatable, once per type")
	fl.StringVar(&f.provenance, "provenance", "", "shorthand for --attest type=provenance: true (mode=min), false, or mode=min|max; default mode=min with --push (BUILDX_NO_DEFAULT_ATTESTATIONS=1 turns that off)")
	fl.StringVar(&f.sbom, "sbom", "", "shorthand for --attest type=sbom: true (the server's scanner), false, or generator=IMAGE")
	fl.BoolVar(&f.load, "load", false, "not supported: kiln has no local docker engine to load into")
	fl.StringVar(&f.contextUpload, "context-upload", contextUploadAuto, "how the context is sent: manifest (only files the server does not have yet, found by content hash), tar (all of it, every time) or auto (manifest, or tar if the server has no context store)")
	fl.StringArrayVarP(&f.outputs, "output", "o", nil, "also write the result: type=local,dest=DIR (its files; DIR alone means this), type=tar,dest=FILE|- (\"-\" alone means this), type=oci|docker,dest=FILE (an image tarball), type=image,name=NAME (another tag); repeatable")

	c.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		form, err := f.form(cmd, args[0], cmd.InOrStdin(), os.LookupEnv)
		if err != nil {
			return err
		}
		defer form.wipe()
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		if err := form.loadRegistryAuth(ctx, cl.registryHost()); err != nil {
			return err
		}
		// A write to a reader that went away cancels the build rather than
		// killing the client with SIGPIPE and leaving the build running.
		catchSIGPIPE()
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		stdout := newGuardedWriter(cmd.OutOrStdout(), "standard output", cancel)
		stderr := newGuardedWriter(cmd.ErrOrStderr(), "standard error", cancel)
		mode := f.progress
		if f.quiet {
			mode = progressQuiet
		}
		mode = resolveProgress(mode, stderr)
		return runBuild(ctx, g.settings, cl, form, buildIO{mode: mode, stdout: stdout, stderr: stderr})
	})
	return c
}

var (
	// argNameRE is what docker accepts as a build argument name: an
	// environment variable name.
	argNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	// secretIDRE keeps ids to what survives a multipart filename and a
	// BuildKit secret mount id unchanged.
	secretIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
)

const maxInlineDockerfile = 4 << 20

// form validates the flags and assembles the request. Nothing is sent if it
// fails.
func (f *buildFlags) form(cmd *cobra.Command, dir string, stdin io.Reader, lookupEnv func(string) (string, bool)) (*buildForm, error) {
	switch f.progress {
	case progressAuto, progressTTY, progressPlain, progressJSON, progressQuiet, progressRawJSON:
	default:
		return nil, usageError(cmd, "invalid --progress %q: use %s", f.progress, progressModes)
	}
	if f.quiet && f.progress != progressAuto && f.progress != progressQuiet {
		return nil, usageError(cmd, "-q/--quiet shows no progress: drop --progress %s or -q", f.progress)
	}
	switch f.contextUpload {
	case contextUploadAuto, contextUploadManifest, contextUploadTar:
	default:
		return nil, usageError(cmd, "invalid --context-upload %q: use auto, manifest or tar", f.contextUpload)
	}
	kind := contextKind(dir)
	switch kind {
	case contextDir:
		st, err := os.Stat(dir)
		if err != nil {
			return nil, usageError(cmd, "build context %q: %v", dir, err)
		}
		switch {
		case st.IsDir():
		case st.Mode().IsRegular():
			ok, err := fileIsArchive(dir)
			if err != nil {
				return nil, usageError(cmd, "build context %q: %v", dir, err)
			}
			if !ok {
				return nil, usageError(cmd, "build context %q is a file but not a tar (plain, gzip or zstd): give a directory, a tar, a git URL or - (a Dockerfile or a tar on standard input)", dir)
			}
			kind = contextTarFile
		default:
			return nil, usageError(cmd, "build context %q is not a directory or a tar file", dir)
		}
	}
	if kind != contextDir && f.contextUpload == contextUploadManifest {
		return nil, usageError(cmd, "--context-upload=manifest sends a context directory by content; %q is not a directory", dir)
	}
	form := &buildForm{contextUpload: f.contextUpload, kind: kind}
	if kind == contextDir {
		form.dir = dir
	}
	add := func(name, value string) { form.fields = append(form.fields, formField{name, value}) }

	push := f.push
	for _, t := range f.tags {
		if strings.TrimSpace(t) == "" {
			return nil, usageError(cmd, "empty -t/--tag: give an image name like myapp:1.0")
		}
		add("tags", t)
		form.registryRefs = append(form.registryRefs, t)
	}
	stdouts := 0
	for _, v := range f.outputs {
		o, names, pushOut, err := parseOutput(v)
		if err != nil {
			return nil, usageError(cmd, "%v", err)
		}
		push = push || pushOut
		for _, n := range names {
			add("tags", n)
			form.registryRefs = append(form.registryRefs, n)
		}
		if o != nil {
			form.outputs = append(form.outputs, o)
			if o.dest == "-" {
				stdouts++
			}
		}
	}
	if push {
		add("push", "true")
	}
	switch {
	case f.check && f.call != "build" && f.call != "check":
		return nil, usageError(cmd, "--check is --call check; drop --call %s", f.call)
	case f.check || f.call == "check":
		form.check = true
		for _, c := range []struct {
			set  bool
			flag string
		}{{len(f.tags) > 0, "-t"}, {push, "--push"}, {len(f.outputs) > 0, "--output"}, {len(f.cacheTo) > 0, "--cache-to"},
			{f.quiet, "-q"}, {f.iidFile != "", "--iidfile"}, {f.metadataFile != "", "--metadata-file"}} {
			if c.set {
				return nil, usageError(cmd, "--call check runs the Dockerfile's checks and builds no image: drop %s", c.flag)
			}
		}
		add("call", "check")
	case f.call != "build":
		return nil, usageError(cmd, "--call %q: kiln takes build and check", f.call)
	}
	if form.check {
		if len(f.attest) > 0 || f.provenance != "" || f.sbom != "" {
			return nil, usageError(cmd, "--call check runs the Dockerfile's checks and builds no image: drop --attest, --provenance and --sbom")
		}
	} else {
		as, err := attests(f.attest, f.provenance, f.sbom, push, lookupEnv)
		if err != nil {
			return nil, usageError(cmd, "%v", err)
		}
		for _, a := range as {
			add("attest", a)
		}
	}
	for _, a := range f.allow {
		for _, e := range strings.Split(a, ",") {
			if e = strings.TrimSpace(e); e != "network.host" && e != "security.insecure" {
				return nil, usageError(cmd, "--allow %q: use network.host or security.insecure", e)
			}
			add("allow", e)
		}
	}
	for _, bc := range f.buildContexts {
		name, src, ok := strings.Cut(bc, "=")
		if !ok || name == "" || src == "" {
			return nil, usageError(cmd, "--build-context %q: use NAME=DIR, NAME=docker-image://REF, NAME=GIT-URL or NAME=https://URL", bc)
		}
		switch {
		case strings.HasPrefix(src, "docker-image://"):
			add("build_contexts", bc)
			form.registryRefs = append(form.registryRefs, strings.TrimPrefix(src, "docker-image://"))
		case strings.Contains(src, "://") || contextKind(src) == contextGit:
			// git, http(s), and what the server explains it cannot take
			// (oci-layout://).
			add("build_contexts", bc)
		default:
			st, err := os.Stat(src)
			if err != nil || !st.IsDir() {
				return nil, usageError(cmd, "--build-context %s=%s: not a directory (and not docker-image://, a git URL or an https:// URL)", name, src)
			}
			form.namedDirs = append(form.namedDirs, namedDir{name, src})
		}
	}
	for _, c := range f.cacheFrom {
		add("cache_from", c)
		form.registryRefs = append(form.registryRefs, cacheRefOf(c))
	}
	if len(f.cacheTo) > 1 {
		return nil, usageError(cmd, "--cache-to is given %d times; a build exports one registry cache", len(f.cacheTo))
	}
	for _, c := range f.cacheTo {
		add("cache_to", c)
		form.registryRefs = append(form.registryRefs, cacheRefOf(c))
	}
	if stdouts > 1 {
		return nil, usageError(cmd, "only one --output can write to standard output (dest=-)")
	}
	if stdouts > 0 && f.quiet {
		return nil, usageError(cmd, "-q prints the image digest on standard output, where --output - writes its tar: write the tar to a file (dest=FILE) or drop -q")
	}
	if f.detach {
		for _, c := range []struct {
			set  bool
			flag string
		}{{len(form.outputs) > 0, "--output"}, {f.iidFile != "", "--iidfile"}, {f.metadataFile != "", "--metadata-file"}} {
			if c.set {
				return nil, usageError(cmd, "%s needs the build's result, which --detach does not wait for: drop one of them (kiln builds show ID has the result later)", c.flag)
			}
		}
	}
	form.quiet, form.iidFile, form.metadataFile, form.detach = f.quiet, f.iidFile, f.metadataFile, f.detach
	if !f.detach {
		// The server cancels an attached build whose client went away.
		add("attach", "true")
	}

	if kind != contextDir {
		if err := f.otherContext(form, dir, stdin, add); err != nil {
			return nil, usageError(cmd, "%v", err)
		}
	} else if dfPath, inline, err := resolveDockerfile(dir, f.file, stdin); err != nil {
		return nil, usageError(cmd, "%v", err)
	} else if inline != nil {
		add("dockerfile", string(inline))
		// Pack always includes the Dockerfile it is given; an inline one is
		// not part of the context, so hand it a path outside the context.
		form.dockerfile = "/dev/stdin"
		if abs, err := filepath.Abs(f.file); err == nil && f.file != "-" {
			form.dockerfile = abs
		}
	} else {
		add("dockerfile_path", dfPath)
		form.dockerfile = filepath.FromSlash(dfPath)
	}

	args, err := parseBuildArgs(f.buildArgs, lookupEnv)
	if err != nil {
		return nil, usageError(cmd, "%v", err)
	}
	if len(args) > 0 {
		b, _ := json.Marshal(args)
		add("build_args", string(b))
	}
	if f.target != "" {
		add("target", f.target)
	}
	platforms := f.platforms
	if v, ok := lookupEnv("DOCKER_DEFAULT_PLATFORM"); ok && len(platforms) == 0 && v != "" {
		platforms = []string{v}
	}
	n := 0
	for _, p := range platforms {
		add("platform", p)
		n += len(strings.FieldsFunc(p, func(r rune) bool { return r == ',' }))
	}
	for _, o := range form.outputs {
		if n > 1 && o.docker {
			return nil, usageError(cmd, "--output type=docker writes one image, and --platform asks for %d: use type=oci (the whole index, which docker load also reads), or type=local or type=tar for each platform's files", n)
		}
	}
	if f.noCache {
		add("no_cache", "true")
	}
	if f.pull {
		add("pull", "true")
	}
	if f.cacheScope != "" {
		add("cache_scope", f.cacheScope)
	}
	if f.globalCache && f.globalCacheKey == "" {
		return nil, usageError(cmd, "--global-cache needs --global-cache-key to name the global cache to export to")
	}
	if f.globalCacheKey != "" {
		add("global_cache_key", f.globalCacheKey)
	}
	if f.globalCache {
		add("global_cache", "true")
	}
	for _, n := range []struct {
		flag, field string
		v           int
	}{{"cpus", "cpus", f.cpus}, {"memory", "memory_mb", f.memoryMB}, {"disk", "disk_gb", f.diskGB}} {
		if !cmd.Flags().Changed(n.flag) {
			continue
		}
		if n.v <= 0 {
			return nil, usageError(cmd, "--%s must be a positive number, got %d", n.flag, n.v)
		}
		add(n.field, strconv.Itoa(n.v))
	}
	if f.timeout != "" {
		secs, err := parseTimeout(f.timeout)
		if err != nil {
			return nil, usageError(cmd, "%v", err)
		}
		add("timeout_seconds", strconv.Itoa(secs))
	}

	switch f.network {
	case "", "egress", "isolated":
	default:
		return nil, usageError(cmd, "--network %q: use egress or isolated", f.network)
	}
	if f.network == "isolated" && len(f.allowDomains) > 0 {
		return nil, usageError(cmd, "--allow-domain needs --network egress: isolated builds reach nothing but kiln's registry")
	}
	if f.network != "" {
		add("network", f.network)
	}
	for _, d := range f.allowDomains {
		add("allowed_domains", d)
	}

	if f.load {
		return nil, usageError(cmd, "--load is not supported: kiln has no local docker engine; the image is in kiln's registry (docker pull it from there), or write it as a tarball with -o type=docker,dest=FILE and `docker load -i FILE`")
	}
	for _, kv := range []struct {
		flag, field string
		vals        []string
	}{{"label", "labels", f.labels}, {"annotation", "annotations", f.annotations}} {
		if len(kv.vals) == 0 {
			continue
		}
		m := map[string]string{}
		for _, v := range kv.vals {
			k, val, ok := strings.Cut(v, "=")
			if !ok || k == "" {
				return nil, usageError(cmd, "--%s %q: use KEY=VALUE", kv.flag, v)
			}
			m[k] = val
		}
		b, _ := json.Marshal(m)
		add(kv.field, string(b))
	}
	for _, h := range f.addHosts {
		add("add_hosts", h)
	}
	if f.shmSize != "" {
		n, err := config.ParseBytes(f.shmSize)
		if err != nil || n <= 0 {
			return nil, usageError(cmd, "--shm-size %q: give a size such as 64m or 1g", f.shmSize)
		}
		add("shm_size", strconv.FormatInt(n, 10))
	}
	for _, u := range f.ulimits {
		add("ulimits", u)
	}

	form.secrets, err = readSecrets(f.secrets, lookupEnv)
	if err != nil {
		return nil, usageError(cmd, "%v", err)
	}
	if err := f.sshForm(form, add, lookupEnv); err != nil {
		return nil, usageError(cmd, "%v", err)
	}
	return form, nil
}

// otherContext sets up a context kiln does not pack: a Dockerfile or a
// tar on stdin, a tar file, or a git URL. -f names the Dockerfile inside
// a tar or a repository, or "-" reads it from stdin.
func (f *buildFlags) otherContext(form *buildForm, arg string, stdin io.Reader, add func(name, value string)) error {
	readInline := func(r io.Reader, what string) error {
		b, err := io.ReadAll(io.LimitReader(r, maxInlineDockerfile+1))
		if err != nil {
			return fmt.Errorf("read Dockerfile from %s: %w", what, err)
		}
		if len(b) > maxInlineDockerfile {
			return fmt.Errorf("the Dockerfile on %s is larger than %s", what, humanSize(maxInlineDockerfile))
		}
		if len(bytes.TrimSpace(b)) == 0 {
			return fmt.Errorf("standard input is empty: pipe a Dockerfile (kiln build - < Dockerfile) or a tar of the context (kiln build - < ctx.tar.gz)")
		}
		add("dockerfile", string(b))
		return nil
	}
	inside := func() error {
		if f.file == "" {
			return nil
		}
		p, err := dockerfileInContext(f.file)
		if err != nil {
			return err
		}
		add("dockerfile_path", p)
		return nil
	}
	switch form.kind {
	case contextStdin:
		if f.file == "-" {
			return errors.New("-f - and the context - both read standard input: give the Dockerfile on stdin with the context -, or the context as a directory, tar file or URL")
		}
		br, head, err := peekStdin(stdin)
		if err != nil {
			return err
		}
		if isArchive(head) {
			form.raw = &rawContext{name: "standard input", r: br}
			return inside()
		}
		// A Dockerfile and no context, as docker build - does.
		if f.file != "" {
			return fmt.Errorf("-f %q: standard input holds the Dockerfile (it is not a tar), so there is no context for -f to look in; drop -f", f.file)
		}
		if err := readInline(br, "standard input"); err != nil {
			return err
		}
		form.raw = &rawContext{name: "an empty context", r: bytes.NewReader(emptyTar())}
		return nil
	case contextTarFile:
		form.raw = &rawContext{name: arg, path: arg}
	case contextGit, contextHTTP:
		add("context_url", arg)
	}
	if f.file == "-" {
		return readInline(stdin, "standard input")
	}
	return inside()
}

// wipe overwrites the secret values once they have been sent.
func (form *buildForm) wipe() {
	for _, s := range slices.Concat(form.secrets, form.sshKeys) {
		clear(s.value)
	}
	clear(form.registryAuth)
}

// cacheRefOf is the ref of a --cache-from/--cache-to value.
func cacheRefOf(spec string) string {
	if !strings.Contains(spec, "=") {
		return spec
	}
	for _, kv := range strings.Split(spec, ",") {
		if ref, ok := strings.CutPrefix(kv, "ref="); ok {
			return ref
		}
	}
	return ""
}

// loadRegistryAuth looks up, in the user's docker config, credentials for
// every registry other than kiln's (at kilnHost) that the build's names
// and caches are on, as buildx does. Registries without any are reached
// anonymously; the server says so if that is refused.
func (form *buildForm) loadRegistryAuth(ctx context.Context, kilnHost string) error {
	var hosts []string
	for _, ref := range form.registryRefs {
		first, _, ok := strings.Cut(ref, "/")
		if !ok || !strings.ContainsAny(first, ".:") && first != "localhost" || first == kilnHost || slices.Contains(hosts, first) {
			continue
		}
		hosts = append(hosts, first)
	}
	if len(hosts) == 0 {
		return nil
	}
	cfg, err := dockerconfig.Load()
	if err != nil {
		return fmt.Errorf("read registry credentials: %w", err)
	}
	for _, h := range hosts {
		c, ok, err := cfg.Credentials(ctx, h)
		if err != nil {
			return fmt.Errorf("registry credentials for %s: %w", h, err)
		}
		if !ok {
			continue
		}
		if form.registryAuth == nil {
			form.registryAuth = map[string]dockerconfig.Credentials{}
		}
		form.registryAuth[h] = c
	}
	return nil
}

// resolveDockerfile decides how the Dockerfile travels: as a path inside
// the context (dockerfile_path), or inline (dockerfile) when it lies
// outside the context or comes from stdin. -f is relative to the current
// directory, as with docker build.
func resolveDockerfile(dir, file string, stdin io.Reader) (path string, inline []byte, err error) {
	if file == "-" {
		b, err := io.ReadAll(io.LimitReader(stdin, maxInlineDockerfile+1))
		if err != nil {
			return "", nil, fmt.Errorf("read Dockerfile from stdin: %w", err)
		}
		if len(b) > maxInlineDockerfile {
			return "", nil, fmt.Errorf("the Dockerfile on stdin is larger than %s", humanSize(maxInlineDockerfile))
		}
		return "", b, nil
	}
	if file == "" {
		p := filepath.Join(dir, "Dockerfile")
		st, err := os.Stat(p)
		if err != nil || !st.Mode().IsRegular() {
			return "", nil, fmt.Errorf("no Dockerfile at %s: add one, or name it with -f", p)
		}
		return "Dockerfile", nil, nil
	}
	st, err := os.Stat(file)
	if err != nil {
		return "", nil, fmt.Errorf("Dockerfile %q: %w", file, err)
	}
	if !st.Mode().IsRegular() {
		return "", nil, fmt.Errorf("Dockerfile %q is not a regular file", file)
	}
	if rel, ok := within(dir, file); ok {
		return filepath.ToSlash(rel), nil, nil
	}
	if st.Size() > maxInlineDockerfile {
		return "", nil, fmt.Errorf("Dockerfile %q is larger than %s", file, humanSize(maxInlineDockerfile))
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", nil, fmt.Errorf("read Dockerfile: %w", err)
	}
	return "", b, nil
}

// within reports whether file lies inside dir, and its path relative to
// dir. Symlinks are resolved so that ./ctx/Dockerfile and a link to it
// agree.
func within(dir, file string) (string, bool) {
	real := func(p string) string {
		abs, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		if r, err := filepath.EvalSymlinks(abs); err == nil {
			return r
		}
		return abs
	}
	rel, err := filepath.Rel(real(dir), real(file))
	if err != nil || !filepath.IsLocal(rel) {
		return "", false
	}
	return rel, true
}

// parseBuildArgs applies docker's rules: NAME=VALUE sets a value, NAME
// alone takes it from the environment and is left out when unset there (so
// the Dockerfile's default applies).
func parseBuildArgs(specs []string, lookupEnv func(string) (string, bool)) (map[string]string, error) {
	out := map[string]string{}
	for _, s := range specs {
		name, value, hasValue := strings.Cut(s, "=")
		if !argNameRE.MatchString(name) {
			return nil, fmt.Errorf("invalid --build-arg %q: the name must be letters, digits and underscores, not starting with a digit (NAME=VALUE or NAME)", s)
		}
		if !hasValue {
			v, ok := lookupEnv(name)
			if !ok {
				continue
			}
			value = v
		}
		out[name] = value
	}
	return out, nil
}

// parseTimeout accepts whole seconds ("600") or a Go duration ("10m").
func parseTimeout(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 {
			return 0, fmt.Errorf("--timeout must be positive, got %q", s)
		}
		return n, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < time.Second {
		return 0, fmt.Errorf("invalid --timeout %q: give seconds (600) or a duration (10m)", s)
	}
	return int(d / time.Second), nil
}

// readSecrets parses --secret specs and reads their values. Messages name
// the id and where the value was to come from, never the value.
//
// Accepted keys: id, src|source (a file), env (an environment variable),
// type (file|env, optional). Without src or env the value comes from the
// environment variable named like the id if it is set, else from a file
// named like the id, as buildx does.
func readSecrets(specs []string, lookupEnv func(string) (string, bool)) ([]secret, error) {
	var out []secret
	for _, spec := range specs {
		var id, src, env, typ string
		for _, kv := range strings.Split(spec, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("invalid --secret %q: expected comma-separated key=value pairs like id=npm,src=.npmrc", spec)
			}
			switch strings.ToLower(strings.TrimSpace(k)) {
			case "id":
				id = v
			case "src", "source":
				src = v
			case "env":
				env = v
			case "type":
				typ = v
			default:
				return nil, fmt.Errorf("invalid --secret %q: unknown key %q (use id, src or env)", spec, k)
			}
		}
		if typ != "" && typ != "file" && typ != "env" {
			return nil, fmt.Errorf("invalid --secret %q: type must be file or env", spec)
		}
		if src != "" && env != "" {
			return nil, fmt.Errorf("invalid --secret %q: give src or env, not both", spec)
		}
		if id == "" && src != "" {
			id = filepath.Base(src)
		}
		if id == "" {
			return nil, fmt.Errorf("invalid --secret %q: missing id=", spec)
		}
		if !secretIDRE.MatchString(id) {
			return nil, fmt.Errorf("invalid secret id %q: use letters, digits, '.', '_' and '-'", id)
		}
		if slices.ContainsFunc(out, func(s secret) bool { return s.id == id }) {
			return nil, fmt.Errorf("secret %q is given twice", id)
		}
		if src == "" && env == "" {
			switch typ {
			case "env":
				env = id
			case "file":
				src = id
			default:
				if _, ok := lookupEnv(id); ok {
					env = id
				} else {
					src = id
				}
			}
		}
		var value []byte
		if env != "" {
			v, ok := lookupEnv(env)
			if !ok {
				return nil, fmt.Errorf("secret %q: environment variable %s is not set", id, env)
			}
			value = []byte(v)
		} else {
			v, err := os.ReadFile(src)
			if err != nil {
				var pe *os.PathError
				if errors.As(err, &pe) {
					err = pe.Err
				}
				return nil, fmt.Errorf("secret %q: read %s: %v", id, src, err)
			}
			value = v
		}
		out = append(out, secret{id: id, value: value})
	}
	return out, nil
}

// buildIO is where a build's output goes.
type buildIO struct {
	// mode is the resolved --progress mode (never auto).
	mode string
	// stdout carries only what was asked for: the digest with -q, the tar
	// of --output -, the build id with --detach. stderr carries progress
	// and notes.
	stdout, stderr *guardedWriter
}

// runBuild uploads, follows and reports a build.
func runBuild(ctx context.Context, s settings, c *client, form *buildForm, o buildIO) error {
	mode := o.mode
	// Notes about the build are for people: programs reading rawjson, and
	// -q/quiet, get none.
	var info io.Writer = o.stderr
	if silentProgress(mode) {
		info = io.Discard
	}
	var uploadNotes io.Writer = o.stderr
	if silentProgress(mode) {
		// Warnings ("kiln: warning: ...") still, but not the summary.
		uploadNotes = kilnLinesOnly{o.stderr}
	}
	b, err := upload(ctx, c, form, mode, o.stderr, uploadNotes)
	if err != nil {
		if oe, ok := outputFailed(ctx); ok {
			return &exitError{code: exitFailure, err: fmt.Errorf("%v; upload stopped, no build was started", oe)}
		}
		return err
	}
	form.wipe()
	stopSSH := startSSHSession(ctx, c, b.Id, form.sshAgents, o.stderr)
	defer stopSSH()

	if form.detach {
		// The id is the one thing a detached build has to say.
		if _, err := fmt.Fprintln(o.stdout, b.Id); err != nil {
			return &exitError{code: exitFailure, err: fmt.Errorf("build %s submitted, but %v", b.Id, err)}
		}
		return nil
	}

	fmt.Fprintf(info, "build %s %s", b.Id, b.Status)
	if b.QueuePosition != nil && b.Status == api.BuildStatusQueued {
		fmt.Fprintf(info, " (queue position %d)", *b.QueuePosition)
	}
	fmt.Fprintln(info)
	// A tenant's app:1 is stored as <namespace>/app:1: say so once, where
	// the name was given, rather than leave it to be found in images ls.
	if b.Tenant != nil && *b.Tenant != "" {
		for _, t := range b.Tags {
			if short, ok := strings.CutPrefix(t, *b.Tenant+"/"); ok && form.hasTag(short) {
				fmt.Fprintf(info, "image %s is named %s (your namespace is %s/; see kiln whoami)\n", short, t, *b.Tenant)
			}
		}
	}

	d := newDisplay(mode, o.stderr, o.stderr, s)
	f := &follower{c: c, s: s, id: b.Id, onEvent: d.event, onNote: d.note, onPoll: d.polled}
	final, err := f.follow(ctx)
	d.close()
	if err != nil {
		if ctx.Err() != nil {
			if oe, ok := outputFailed(ctx); ok {
				return cancelAfterOutputError(c, s, b.Id, oe)
			}
			return cancelAfterInterrupt(c, s, b.Id, info)
		}
		return fmt.Errorf("following build %s: %w", b.Id, err)
	}
	if form.check {
		return reportCheck(o.stdout, final)
	}
	if err := report(info, final); err != nil {
		return err
	}
	if err := writeResultFiles(ctx, c, form, final, o.stderr); err != nil {
		return err
	}
	for _, out := range form.outputs {
		what, err := fetchOutput(ctx, c, *final, out, o.stdout)
		if err != nil {
			return err
		}
		fmt.Fprintf(info, "output: %s\n", what)
	}
	if form.quiet {
		if _, err := fmt.Fprintln(o.stdout, str(final.ImageDigest)); err != nil {
			return &exitError{code: exitFailure, err: fmt.Errorf("build %s succeeded, but %v", final.Id, err)}
		}
	}
	return nil
}

// cancelAfterOutputError cancels the build whose progress could no longer
// be written: nobody is watching it any more.
func cancelAfterOutputError(c *client, s settings, id string, oe *outputError) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cancelTimeout)
	defer cancel()
	b, finished, err := c.cancelBuild(ctx, id)
	switch {
	case err != nil:
		return &exitError{code: exitFailure, err: fmt.Errorf("%v; canceling build %s failed: %v; it may still be running: run `kiln builds cancel %s`", oe, id, err, id)}
	case finished:
		return &exitError{code: exitFailure, err: fmt.Errorf("%v; build %s had already finished (%s)", oe, id, b.Status)}
	}
	return &exitError{code: exitFailure, err: fmt.Errorf("%v; build %s canceled", oe, id)}
}

// cancelAfterInterrupt cancels the build the user stopped waiting for.
func cancelAfterInterrupt(c *client, s settings, id string, w io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cancelTimeout)
	defer cancel()
	b, finished, err := c.cancelBuild(ctx, id)
	switch {
	case err != nil:
		return interrupted("interrupted, but canceling build %s failed: %v; it may still be running: run `kiln builds cancel %s`", id, err, id)
	case finished:
		fmt.Fprintf(w, "build %s had already finished (%s) when interrupted\n", id, b.Status)
		return interrupted("interrupted")
	}
	fmt.Fprintf(w, "build %s canceled\n", id)
	return interrupted("interrupted")
}

// reportCheck prints what the Dockerfile's checks found on stdout, as
// docker build --check does, and exits 1 if they found anything.
func reportCheck(stdout io.Writer, b *api.Build) error {
	if b.Status != api.BuildStatusSucceeded {
		return report(io.Discard, b)
	}
	if b.Check == nil {
		return &exitError{code: exitFailure, err: fmt.Errorf("build %s ran its checks but the server reported no result", b.Id)}
	}
	c := b.Check
	if c.Report != "" {
		fmt.Fprintln(stdout, strings.TrimRight(c.Report, "\n"))
		fmt.Fprintln(stdout)
	}
	switch {
	case c.Error != nil && *c.Error != "":
		return &exitError{code: exitFailure, err: fmt.Errorf("the Dockerfile's checks could not complete: %s", *c.Error)}
	case c.Warnings == 0:
		fmt.Fprintln(stdout, "Check complete, no warnings found.")
		return nil
	case c.Warnings == 1:
		return &exitError{code: exitFailure, err: errors.New("check complete, 1 warning has been found")}
	}
	return &exitError{code: exitFailure, err: fmt.Errorf("check complete, %d warnings have been found", c.Warnings)}
}

// report prints the outcome and turns a failed build into exit status 1.
func report(w io.Writer, b *api.Build) error {
	switch b.Status {
	case api.BuildStatusSucceeded:
		took := ""
		if b.StartedAt != nil && b.FinishedAt != nil {
			took = " in " + seconds(b.FinishedAt.Sub(*b.StartedAt))
		}
		fmt.Fprintf(w, "build %s succeeded%s (%d/%d steps cached)\n", b.Id, took, b.StepsCached, b.StepsTotal)
		if b.DedupOf != nil && *b.DedupOf != "" {
			fmt.Fprintf(w, "reused the result of identical build %s\n", *b.DedupOf)
		}
		fmt.Fprintf(w, "digest: %s\n", str(b.ImageDigest))
		fmt.Fprintf(w, "image:  %s\n", b.Image)
		for _, t := range b.Tags {
			fmt.Fprintf(w, "tag:    %s\n", t)
		}
		return nil
	case api.BuildStatusCanceled:
		return &exitError{code: exitFailure, err: fmt.Errorf("build %s was canceled", b.Id)}
	}
	msg := str(b.Error)
	if msg == "" {
		msg = "the server gave no reason"
	}
	return &exitError{code: exitFailure, err: fmt.Errorf("build %s %s: %s", b.Id, b.Status, msg)}
}
