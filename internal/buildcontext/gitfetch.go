package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// FormatGit is Info.Format for a context FetchGit wrote.
const FormatGit = "git"

// DefaultGitFetchTimeout bounds FetchGit when it is given no timeout.
const DefaultGitFetchTimeout = 10 * time.Minute

// GitFetchOptions tune FetchGit.
type GitFetchOptions struct {
	// Timeout bounds the whole fetch; DefaultGitFetchTimeout if zero.
	Timeout time.Duration
	// AllowRemote, if set, is asked about every remote before it is
	// fetched, the context's own and each submodule's (whose URLs come
	// from the repository, not from the person who started the build): a
	// build's allowed_domains, say. Its error, which should say what is
	// allowed, refuses the context.
	AllowRemote func(remote string) error
}

// FetchGit writes the tree of g's pinned commit (g.Commit, as ResolveGit
// sets it), or of its SubDir, into dir, which must not exist or must be
// empty, the way BuildKit's git source presents a git context, and returns
// the same Info Receive would for that tree: so the vm runtime, whose
// builder has no git and no network, gets an ordinary context directory.
//
// It runs the host's git in a temporary bare repository next to dir:
// `git fetch --depth=1 <remote> <commit>`, falling back to fetching every
// branch and tag when the server refuses an unadvertised commit (protocol
// v0 servers without uploadpack.allowReachableSHA1InWant, dumb HTTP), then
// `git archive` streamed straight into dir. What lands in dir:
//
//   - the commit's tree, or SubDir's, without any .git; SubDir must be a
//     directory of the commit (a clear error otherwise) and may lie inside a
//     submodule;
//   - submodules in the context fetched at their recorded commits, depth 1
//     and recursively, as BuildKit does unless asked not to (relative URLs
//     resolve against the remote; "update = none" leaves the empty
//     directory, as git does);
//   - content as `git checkout` writes it: the repository's .gitattributes
//     conversions (eol, ident) apply, export-ignore and export-subst do not,
//     filter drivers (git-lfs) are not run (BuildKit has none configured
//     either: LFS files stay pointers);
//   - modes as a checkout with umask 022 (BuildKit's) makes them: 0644,
//     0755 for executables, 0755 directories; symlinks exactly as committed
//     (unlike an upload, a symlink leaving the context is kept, as BuildKit
//     keeps it; it is only ever written, never followed);
//   - mtimes as Receive sets them: ContentTime of each file's content,
//     directories the commit's time.
//
// .dockerignore is not applied to the files (BuildKit's frontend applies
// it); Info.Hash honours it exactly as for a received context, so the same
// tree uploaded and fetched hashes the same. Info.Bytes is what git
// downloaded, Info.UncompressedBytes the tar streams git archive produced.
//
// The fetch is bounded like an upload: lim.MaxBytes bounds what git
// downloads (the whole commit's tree, its history too on the fallback),
// lim.MaxUncompressedBytes the context's tar stream and lim.MaxEntries its
// files, directories and links. opt.Timeout and ctx bound the time. Git
// never prompts, reads no system or global git config and no GIT_*
// variable of the server's, and reaches only https, http, ssh and git
// remotes; opt.AllowRemote may narrow that down.
//
// On any error dir is removed (unless it already existed and was not
// empty: then nothing is touched), and the error is an *Error of class
// errdefs.ErrInvalid for a context that cannot be used (a missing SubDir,
// a broken submodule), ErrTooLarge over a limit, ErrUpstream (wrapping
// ErrGitUnreachable) when the remote fails, ErrUpstreamTimeout on the
// timeout, ErrTimeout/ErrCanceled when ctx ends, and no class for the
// server's own failures.
func FetchGit(ctx context.Context, g GitContext, dir string, lim Limits, opt GitFetchOptions) (info Info, err error) {
	if !commitPattern.MatchString(g.Commit) {
		return Info{}, &Error{Msg: fmt.Sprintf("the git context %s has no pinned commit; this is a kiln bug (ResolveGit was not run), report it", redactURL(g.Remote))}
	}
	if err := checkFetchURL(g.Remote); err != nil {
		return Info{}, badInput("the git context's remote %q cannot be fetched: %v", redactURL(g.Remote), err)
	}
	if opt.AllowRemote != nil {
		if err := opt.AllowRemote(g.Remote); err != nil {
			return Info{}, badInput("the git context's remote %s is not allowed: %v", redactURL(g.Remote), err)
		}
	}
	if err := ctx.Err(); err != nil {
		return Info{}, gitCanceled(err)
	}
	timeout := opt.Timeout
	if timeout <= 0 {
		timeout = DefaultGitFetchTimeout
	}
	if err := makeTargetDir(dir); err != nil {
		return Info{}, err
	}
	f := &gitFetcher{parent: ctx, timeout: timeout, allow: opt.AllowRemote, g: g, lim: lim}
	var cancel context.CancelFunc
	f.ctx, cancel = context.WithTimeout(ctx, timeout)
	defer cancel()
	defer func() {
		if f.x != nil {
			f.x.closeSubRoot()
			if closeErr := f.x.root.Close(); err == nil && closeErr != nil {
				err = serverFault(closeErr, "closing the build context directory failed")
			}
		}
		if f.work != "" {
			_ = removeTree(f.work)
		}
		if err != nil {
			err = f.classify(err)
			_ = removeTree(dir)
			info = Info{}
		}
	}()

	// The repository lives next to dir, on the disk contexts are on and
	// where kiln's restart cleanup finds it if the server dies meanwhile.
	f.work, err = os.MkdirTemp(filepath.Dir(dir), filepath.Base(dir)+".git-*")
	if err != nil {
		f.work = ""
		return Info{}, serverFault(err, "creating a directory to fetch the git context into failed")
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return Info{}, serverFault(err, "opening the build context directory failed")
	}
	f.x = &extractor{
		ctx:   f.ctx,
		root:  root,
		lim:   lim,
		nodes: map[string]*node{".": {typ: typeDir}},
		buf:   make([]byte, 128<<10),
	}
	if err := f.init(); err != nil {
		return Info{}, err
	}
	if err := f.fetch(g.Remote, g.Commit); err != nil {
		return Info{}, err
	}
	remote, commit, sub, err := f.locate(g.Remote, g.Commit, g.SubDir)
	if err != nil {
		return Info{}, err
	}
	if err := f.emit(remote, commit, sub, "", 0); err != nil {
		return Info{}, err
	}
	return f.finish()
}

// maxSubmoduleDepth bounds submodules within submodules. Git sets no
// limit, but no real project nests this deep, and each level is a fetch.
const maxSubmoduleDepth = 16

type gitFetcher struct {
	parent  context.Context // the caller's: tells its cancel from our timeout
	ctx     context.Context
	timeout time.Duration
	allow   func(remote string) error
	g       GitContext
	lim     Limits
	work    string // temporary directory next to dir, holding gitDir
	gitDir  string // the bare repository everything is fetched into
	env     []string
	x       *extractor

	entries  int   // entries written into dir
	stream   int64 // bytes of git archive's tar streams
	download int64 // size of the fetched objects after the last fetch
	fetches  int   // names each fallback fetch's ref namespace

	overStream   bool        // the tar streams passed lim.MaxUncompressedBytes
	overDownload atomic.Bool // the fetched objects passed lim.MaxBytes

	modules map[string]map[string]*gitmodule // .gitmodules by commit
}

// init creates the bare repository. git archive honours the tree's
// .gitattributes; export-ignore and export-subst are turned off here
// ($GIT_DIR/info/attributes wins over the tree's), because a checkout
// does not apply them and BuildKit checks out.
func (f *gitFetcher) init() error {
	f.gitDir = filepath.Join(f.work, "repo.git")
	f.env = gitFetchEnv()
	args := []string{"init", "-q", "--bare", "--template="} // no hooks, no samples
	if len(f.g.Commit) == 64 {
		args = append(args, "--object-format=sha256")
	}
	if _, err := f.run(nil, append(args, "--", f.gitDir)...); err != nil {
		return serverFault(err, "preparing a repository to fetch the git context into failed")
	}
	attrs := filepath.Join(f.gitDir, "info", "attributes")
	if err := os.MkdirAll(filepath.Dir(attrs), 0o700); err != nil {
		return serverFault(err, "preparing a repository to fetch the git context into failed")
	}
	if err := os.WriteFile(attrs, []byte("* -export-ignore -export-subst\n"), 0o600); err != nil {
		return serverFault(err, "preparing a repository to fetch the git context into failed")
	}
	return nil
}

// gitFetchEnv is the environment of every git FetchGit runs: the server's
// own, without any GIT_* variable that could point git elsewhere, and
// with no prompts, no system or global config (HOME stays, for ssh's
// known_hosts and keys), and only network transports.
func gitFetchEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GIT_") && !strings.HasPrefix(kv, "LC_ALL=") {
			env = append(env, kv)
		}
	}
	return append(env,
		"GIT_TERMINAL_PROMPT=0",
		"GIT_ASKPASS=/bin/false",
		"SSH_ASKPASS=/bin/false",
		"GIT_SSH_COMMAND=ssh -o BatchMode=yes -o ConnectTimeout=10",
		"GIT_ALLOW_PROTOCOL=https:http:ssh:git",
		"GIT_PROTOCOL_FROM_USER=0",
		"GIT_CONFIG_NOSYSTEM=1",
		"GIT_CONFIG_GLOBAL="+os.DevNull,
		"GIT_LITERAL_PATHSPECS=1",
		"GIT_NO_REPLACE_OBJECTS=1",
		"LC_ALL=C", // messages we match and show are git's English ones
	)
}

// gitError is a git command that failed, with what it said.
type gitError struct {
	args   []string
	stderr string
	err    error
}

func (e *gitError) Error() string {
	msg := strings.TrimSpace(e.stderr)
	if msg == "" {
		msg = e.err.Error()
	}
	msg = strings.ReplaceAll(msg, "\n", "; ")
	if len(msg) > 500 {
		msg = msg[:500] + "…"
	}
	return msg
}

func (e *gitError) Unwrap() error { return e.err }

// run runs git with args against the repository and returns its stdout
// (nil when stdout is given a writer).
func (f *gitFetcher) run(stdout io.Writer, args ...string) ([]byte, error) {
	return f.runCtx(f.ctx, stdout, args...)
}

func (f *gitFetcher) runCtx(ctx context.Context, stdout io.Writer, args ...string) ([]byte, error) {
	cmd := f.command(ctx, args...)
	var out bytes.Buffer
	if stdout == nil {
		stdout = &out
	}
	stderr := &cappedBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Run(); err != nil {
		return nil, &gitError{args: args, stderr: stderr.String(), err: err}
	}
	return out.Bytes(), nil
}

func (f *gitFetcher) command(ctx context.Context, args ...string) *exec.Cmd {
	full := []string{
		"-c", "protocol.file.allow=never",
		"-c", "core.hooksPath=" + os.DevNull,
		"-c", "gc.auto=0",
		// Keep what is fetched as a pack, written as it arrives, so the
		// download guard sees it grow.
		"-c", "transfer.unpackLimit=1",
		"-c", "maintenance.auto=false",
		"-c", "tar.umask=0022",
	}
	if f.gitDir != "" && args[0] != "init" {
		full = append(full, "--git-dir", f.gitDir)
	}
	cmd := exec.CommandContext(ctx, "git", append(full, args...)...)
	cmd.Dir = f.work
	cmd.Env = f.env
	killGroupOnCancel(cmd)
	cmd.WaitDelay = time.Second
	return cmd
}

// cappedBuffer keeps the first max bytes written to it.
type cappedBuffer struct {
	bytes.Buffer
	max int
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// fetch brings commit from remote into the repository: by id at depth 1
// if the server allows it, else with every branch and tag.
func (f *gitFetcher) fetch(remote, commit string) error {
	byID := f.fetchGuarded("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", "--depth=1", "--", remote, commit)
	if err := f.fetchFailed(byID); err != nil {
		return err
	}
	if byID == nil && f.has(commit) {
		return nil
	}
	f.fetches++
	ns := fmt.Sprintf("refs/kiln/%d/", f.fetches)
	all := f.fetchGuarded("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", "--", remote,
		"+refs/heads/*:"+ns+"heads/*", "+refs/tags/*:"+ns+"tags/*")
	if err := f.fetchFailed(all); err != nil {
		return err
	}
	if all != nil {
		what := all.Error()
		if byID != nil {
			what = byID.Error() + "; fetching all branches and tags: " + what
		}
		return &Error{Class: errdefs.ErrUpstream,
			Msg: fmt.Sprintf("fetching commit %s from %s failed: %s; check that the kiln server can reach the repository", commit, redactURL(remote), what),
			err: fmt.Errorf("%w: %w", ErrGitUnreachable, all)}
	}
	if !f.has(commit) {
		return &Error{Class: errdefs.ErrUpstream,
			Msg: fmt.Sprintf("commit %s is not on any branch or tag of %s (and the server does not serve commits by id); push it to a branch, or build a ref that has it", commit, redactURL(remote)),
			err: ErrGitUnreachable}
	}
	return nil
}

// fetchFailed turns a fetch's failure into the error to stop with, or nil
// when trying otherwise may help.
func (f *gitFetcher) fetchFailed(err error) error {
	switch {
	case err == nil:
		return nil
	case f.overDownload.Load():
		return f.downloadTooLarge()
	case f.ctx.Err() != nil:
		return f.ctx.Err()
	}
	return nil
}

func (f *gitFetcher) downloadTooLarge() *Error {
	return tooLarge("fetching the git repository downloaded more than the %s limit (%s), which bounds a git context's download (the whole commit's tree, with its history when the server does not serve commits by id); send the context as a tar, or ask the kiln operator to raise %s",
		formatBytes(f.lim.MaxBytes), keyMaxBytes, keyMaxBytes)
}

// fetchGuarded runs a fetch while watching the repository's size, and
// stops it once the size passes lim.MaxBytes.
func (f *gitFetcher) fetchGuarded(args ...string) error {
	ctx, cancel := context.WithCancel(f.ctx)
	defer cancel()
	var wg sync.WaitGroup
	if f.lim.MaxBytes > 0 {
		done := make(chan struct{})
		defer func() { close(done); wg.Wait() }()
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-done:
					return
				case <-tick.C:
					if dirSize(f.objects()) > f.lim.MaxBytes {
						f.overDownload.Store(true)
						cancel()
						return
					}
				}
			}
		}()
	}
	_, err := f.runCtx(ctx, nil, args...)
	f.download = dirSize(f.objects())
	if f.lim.MaxBytes > 0 && f.download > f.lim.MaxBytes {
		f.overDownload.Store(true)
		if err == nil {
			err = errOverLimit
		}
	}
	return err
}

// objects is where fetched objects land: what a fetch downloaded.
func (f *gitFetcher) objects() string { return filepath.Join(f.gitDir, "objects") }

// dirSize is the size of the regular files under dir, as far as they can
// be seen while git writes them.
func dirSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func (f *gitFetcher) has(commit string) bool {
	_, err := f.run(nil, "cat-file", "-e", commit+"^{commit}")
	return err == nil
}

// gitTreeEntry is one entry git ls-tree lists.
type gitTreeEntry struct {
	mode, typ, oid, path string
}

// lsTree lists treeish (recursively with -r) restricted to paths.
func (f *gitFetcher) lsTree(recursive bool, treeish string, paths ...string) ([]gitTreeEntry, error) {
	args := []string{"ls-tree", "-z"}
	if recursive {
		args = append(args, "-r")
	}
	args = append(args, treeish, "--")
	for _, p := range paths {
		if p != "" {
			args = append(args, p)
		}
	}
	out, err := f.run(nil, args...)
	if err != nil {
		return nil, err
	}
	var entries []gitTreeEntry
	for _, rec := range bytes.Split(out, []byte{0}) {
		meta, p, ok := bytes.Cut(rec, []byte{'\t'})
		if !ok {
			continue
		}
		fields := strings.Fields(string(meta))
		if len(fields) != 3 {
			continue
		}
		entries = append(entries, gitTreeEntry{mode: fields[0], typ: fields[1], oid: fields[2], path: string(p)})
	}
	return entries, nil
}

// locate finds the tree the context is: sub inside commit, descending into
// submodules on the way. It returns the repository, commit and path inside
// it ("" for the root) whose tree is the context.
func (f *gitFetcher) locate(remote, commit, sub string) (string, string, string, error) {
	if sub == "" {
		return remote, commit, "", nil
	}
	comps := strings.Split(sub, "/")
	inRepo := 0 // comps[inRepo:] are inside the current repository
	for i := range comps {
		p := strings.Join(comps[inRepo:i+1], "/")
		entries, err := f.lsTree(false, commit, p)
		if err != nil {
			return "", "", "", f.gitFault(err, "listing commit %s of %s", commit, redactURL(remote))
		}
		var e *gitTreeEntry
		for j := range entries {
			if entries[j].path == p {
				e = &entries[j]
			}
		}
		shown := strings.Join(comps[:i+1], "/")
		switch {
		case e == nil:
			return "", "", "", badInput("the git context's directory %q does not exist in commit %s of %s; check the path after the \":\" in the git URL (it is relative to the repository's root)", shown, f.g.Commit, redactURL(f.g.Remote))
		case e.typ == "tree":
			continue
		case e.typ == "commit":
			subURL, err := f.submodule(remote, commit, p, e.oid, shown)
			if err != nil {
				return "", "", "", err
			}
			if subURL == "" {
				return "", "", "", badInput("the git context's directory %q is a submodule whose .gitmodules entry says update = none, so it is never checked out; choose another directory", shown)
			}
			remote, commit, inRepo = subURL, e.oid, i+1
		case e.mode == "120000":
			return "", "", "", badInput("the git context's directory %q is a symlink in commit %s of %s; give the directory it points to", shown, f.g.Commit, redactURL(f.g.Remote))
		default:
			return "", "", "", badInput("the git context's directory %q is a file, not a directory, in commit %s of %s; give a directory after the \":\" in the git URL", shown, f.g.Commit, redactURL(f.g.Remote))
		}
	}
	return remote, commit, strings.Join(comps[inRepo:], "/"), nil
}

// emit extracts the tree at p of commit into dir under prefix, then the
// submodules inside it.
func (f *gitFetcher) emit(remote, commit, p, prefix string, depth int) error {
	args := []string{"archive", "--format=tar", commit}
	if p != "" {
		args = append(args, "--", p)
	}
	if err := f.archive(p, prefix, args...); err != nil {
		return err
	}
	entries, err := f.lsTree(true, commit, p)
	if err != nil {
		return f.gitFault(err, "listing commit %s of %s", commit, redactURL(remote))
	}
	for _, e := range entries {
		if e.typ != "commit" {
			continue
		}
		if depth >= maxSubmoduleDepth {
			return badInput("the git context nests submodules more than %d deep (at %q); kiln fetches no deeper", maxSubmoduleDepth, path.Join(prefix, e.path))
		}
		rel := e.path
		if p != "" {
			rel = strings.TrimPrefix(e.path, p+"/")
		}
		at := rel
		if prefix != "" {
			at = prefix + "/" + rel
		}
		subURL, err := f.submodule(remote, commit, e.path, e.oid, at)
		if err != nil {
			return err
		}
		if subURL == "" {
			continue // update = none: git leaves the directory empty
		}
		if err := f.emit(subURL, e.oid, "", at, depth+1); err != nil {
			return err
		}
	}
	return nil
}

// submodule finds the submodule at p (a gitlink to oid) of commit, which
// came from remote, in .gitmodules, fetches oid from it, and returns its
// URL; "" if it is never checked out (update = none). shown names it in
// the context, for messages.
func (f *gitFetcher) submodule(remote, commit, p, oid, shown string) (string, error) {
	mods, err := f.gitmodules(commit)
	if err != nil {
		return "", f.gitFault(err, "reading .gitmodules of commit %s of %s", commit, redactURL(remote))
	}
	m := mods[p]
	if m == nil || m.url == "" {
		return "", badInput("the git context has a submodule at %q with no URL in .gitmodules (commit %s of %s), so it cannot be fetched; fix .gitmodules", shown, commit, redactURL(remote))
	}
	if m.update == "none" {
		return "", nil
	}
	subURL, err := resolveSubmoduleURL(remote, m.url)
	if err == nil {
		err = checkFetchURL(subURL)
	}
	if err != nil {
		return "", badInput("the git context's submodule %q has the URL %q, which kiln does not fetch: %v; fix .gitmodules", shown, redactURL(m.url), err)
	}
	if f.allow != nil {
		if err := f.allow(subURL); err != nil {
			return "", badInput("the git context's submodule %q at %s is not allowed: %v", shown, redactURL(subURL), err)
		}
	}
	if f.has(oid) {
		return subURL, nil // fetched already, for another path
	}
	if err := f.fetch(subURL, oid); err != nil {
		var e *Error
		if errors.As(err, &e) && e.Class == errdefs.ErrUpstream {
			e.Msg = fmt.Sprintf("the git context's submodule %q: %s", shown, e.Msg)
		}
		return "", err
	}
	return subURL, nil
}

type gitmodule struct {
	url, update string
}

// gitmodules reads commit's .gitmodules: submodules by path.
func (f *gitFetcher) gitmodules(commit string) (map[string]*gitmodule, error) {
	if mods, ok := f.modules[commit]; ok {
		return mods, nil
	}
	mods, err := f.readGitmodules(commit)
	if err == nil {
		if f.modules == nil {
			f.modules = map[string]map[string]*gitmodule{}
		}
		f.modules[commit] = mods
	}
	return mods, err
}

func (f *gitFetcher) readGitmodules(commit string) (map[string]*gitmodule, error) {
	entries, err := f.lsTree(false, commit, ".gitmodules")
	if err != nil {
		return nil, err
	}
	if len(entries) != 1 || entries[0].typ != "blob" || entries[0].mode == "120000" {
		return nil, nil // git ignores a .gitmodules symlink too
	}
	out, err := f.run(nil, "config", "-z", "--blob", entries[0].oid, "--get-regexp", `^submodule\..*\.(path|url|update)$`)
	var ge *gitError
	if errors.As(err, &ge) && strings.TrimSpace(ge.stderr) == "" {
		return nil, nil // exit status 1: nothing matched
	}
	if err != nil {
		return nil, err
	}
	byName := map[string]*gitmodule{}
	paths := map[string]string{}
	for _, rec := range bytes.Split(out, []byte{0}) {
		k, v, _ := strings.Cut(string(rec), "\n")
		rest, ok := strings.CutPrefix(k, "submodule.")
		i := strings.LastIndex(rest, ".")
		if !ok || i < 0 {
			continue
		}
		name, key := rest[:i], rest[i+1:]
		m := byName[name]
		if m == nil {
			m = &gitmodule{}
			byName[name] = m
		}
		switch key {
		case "path":
			paths[path.Clean(v)] = name
		case "url":
			m.url = v
		case "update":
			m.update = v
		}
	}
	mods := map[string]*gitmodule{}
	for p, name := range paths {
		mods[p] = byName[name]
	}
	return mods, nil
}

// resolveSubmoduleURL resolves a .gitmodules URL as git does: "./" and
// "../" are relative to the superproject's remote, each "../" dropping
// one component of it (a path's, or an scp-like remote's host part).
func resolveSubmoduleURL(remote, u string) (string, error) {
	if !strings.HasPrefix(u, "./") && !strings.HasPrefix(u, "../") {
		return u, nil
	}
	base := strings.TrimSuffix(remote, "/")
	sep := "/"
	for {
		switch {
		case strings.HasPrefix(u, "./"):
			u = u[2:]
			continue
		case strings.HasPrefix(u, "../"):
			u = u[3:]
			i := strings.LastIndexAny(base, "/:")
			if i < 0 {
				return "", errors.New("it climbs above the remote's URL")
			}
			sep = base[i : i+1]
			base = base[:i]
			continue
		}
		break
	}
	return base + sep + u, nil
}

// redactURL hides a password in a URL's user info, for messages.
func redactURL(u string) string {
	if p, err := url.Parse(u); err == nil && p.User != nil {
		if _, ok := p.User.Password(); ok {
			return p.Redacted()
		}
	}
	return u
}

// checkFetchURL refuses what ParseGitContext refuses for a remote: only
// network transports, nothing git could read as an option.
func checkFetchURL(u string) error {
	if u == "" || strings.HasPrefix(u, "-") || strings.ContainsAny(u, "\x00\n\r\t ") {
		return errors.New("it is empty, starts with '-' or has a space or control character")
	}
	for _, p := range []string{"https://", "http://", "ssh://", "git://"} {
		if strings.HasPrefix(u, p) {
			return nil
		}
	}
	if scpLike.MatchString(u) {
		return nil
	}
	return errors.New("only https://, http://, ssh://, git:// and user@host:path remotes are fetched")
}

// archive runs git archive with args and extracts its entries below strip
// (strip itself and what is outside it are skipped) into dir under prefix.
func (f *gitFetcher) archive(strip, prefix string, args ...string) (err error) {
	ctx, cancel := context.WithCancel(f.ctx)
	defer cancel()
	cmd := f.command(ctx, args...)
	stderr := &cappedBuffer{max: 8 << 10}
	cmd.Stderr = stderr
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return serverFault(err, "running git archive failed")
	}
	if err := cmd.Start(); err != nil {
		return serverFault(err, "running git archive failed")
	}
	counted := &streamCounter{r: pipe, f: f}
	if err := f.extract(tar.NewReader(counted), strip, prefix); err != nil {
		cancel() // git may still be writing: stop it
		_ = cmd.Wait()
		return err
	}
	// The end-of-archive blocks count too, as for an upload.
	if _, err := io.Copy(io.Discard, counted); err != nil {
		cancel()
		_ = cmd.Wait()
		return err
	}
	if err := cmd.Wait(); err != nil {
		return f.gitFault(&gitError{args: args, stderr: stderr.String(), err: err}, "reading commit %s", args[2])
	}
	return nil
}

// streamCounter counts git archive's output into f.stream and fails once
// it passes lim.MaxUncompressedBytes.
type streamCounter struct {
	r io.Reader
	f *gitFetcher
}

func (c *streamCounter) Read(p []byte) (int, error) {
	if c.f.overStream {
		return 0, errOverLimit
	}
	n, err := c.r.Read(p)
	c.f.stream += int64(n)
	if lim := c.f.lim.MaxUncompressedBytes; lim > 0 && c.f.stream > lim {
		c.f.overStream = true
		return 0, errOverLimit
	}
	return n, err
}

// extract writes the entries of one git archive stream.
func (f *gitFetcher) extract(tr *tar.Reader, strip, prefix string) error {
	for {
		if err := f.ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // checked below
		}
		if err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeXGlobalHeader {
			continue // the commit id
		}
		name := strings.TrimSuffix(hdr.Name, "/")
		if strip != "" {
			rest, ok := strings.CutPrefix(name, strip+"/")
			if !ok {
				continue // strip itself and its parents
			}
			name = rest
		}
		if prefix != "" {
			name = prefix + "/" + name
		}
		if err := f.entry(name, hdr, tr); err != nil {
			return err
		}
	}
}

func (f *gitFetcher) entry(name string, hdr *tar.Header, body io.Reader) error {
	if err := checkGitPath(name); err != nil {
		return badInput("the git context cannot be stored: %v", err)
	}
	f.entries++
	if f.lim.MaxEntries > 0 && f.entries > f.lim.MaxEntries {
		return tooLarge("the git context has more than %d files and directories, the limit (%s); choose a smaller directory of the repository (#ref:subdir), or ask the kiln operator to raise %s",
			f.lim.MaxEntries, keyMaxEntries, keyMaxEntries)
	}
	x := f.x
	if err := x.makeParents(name, name); err != nil {
		return err
	}
	dirRoot, base, err := x.parentRoot(name)
	if err != nil {
		return x.fsFault(err, name)
	}
	if old := x.nodes[name]; old != nil && (old.typ != typeDir || hdr.Typeflag != tar.TypeDir) {
		return badInput("the git context has two entries at %q; this repository cannot be used as a context", name)
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if x.nodes[name] == nil {
			if err := dirRoot.Mkdir(base, 0o700); err != nil {
				return x.fsFault(err, name)
			}
		}
		x.nodes[name] = &node{typ: typeDir, mode: 0o755, mtime: hdr.ModTime}
		return nil
	case tar.TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) >= maxPathLen {
			return badInput("the git context's %q is a symlink with an empty or overlong target; this repository cannot be used as a context", name)
		}
		if err := dirRoot.Symlink(hdr.Linkname, base); err != nil {
			return x.fsFault(err, name)
		}
		x.nodes[name] = &node{typ: typeSymlink, link: hdr.Linkname}
		return nil
	case tar.TypeReg, tar.TypeRegA:
		mode := uint32(0o644)
		if hdr.Mode&0o111 != 0 {
			mode = 0o755
		}
		return f.writeFile(dirRoot, base, name, mode, body)
	}
	return badInput("the git context's %q has tar type %q, which git archive does not write; this is a kiln bug, report it", name, string(hdr.Typeflag))
}

func (f *gitFetcher) writeFile(dirRoot *os.Root, base, name string, mode uint32, body io.Reader) error {
	x := f.x
	file, err := dirRoot.OpenFile(base, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return x.fsFault(err, name)
	}
	h := sha256.New()
	_, copyErr := io.CopyBuffer(io.MultiWriter(file, h), body, x.buf)
	if copyErr == nil {
		copyErr = file.Chmod(os.FileMode(mode))
	}
	closeErr := file.Close()
	if copyErr != nil {
		var pe *fs.PathError
		if errors.As(copyErr, &pe) {
			return x.fsFault(copyErr, name)
		}
		return copyErr
	}
	if closeErr != nil {
		return x.fsFault(closeErr, name)
	}
	x.inodes++
	n := &node{typ: typeFile, mode: mode, ino: x.inodes}
	h.Sum(n.sum[:0])
	x.nodes[name] = n
	t := ContentTime(n.sum)
	if err := dirRoot.Chtimes(base, t, t); err != nil {
		return x.fsFault(err, name)
	}
	return nil
}

// checkGitPath refuses a path no checkout would write: git's own trees
// never hold these, but the objects came from the network.
func checkGitPath(p string) error {
	if p == "" || strings.HasPrefix(p, "/") || len(p) > maxPathLen {
		return fmt.Errorf("the repository has an entry %.64q that is empty, absolute or longer than %d bytes", p, maxPathLen)
	}
	comps := strings.Split(p, "/")
	if len(comps) > maxDepth {
		return fmt.Errorf("the repository's %.64q… is nested more than %d directories deep", p, maxDepth)
	}
	for _, c := range comps {
		if c == "" || c == "." || c == ".." || strings.EqualFold(c, ".git") || len(c) > maxComponentLen {
			return fmt.Errorf("the repository has an entry %q that git would not check out", p)
		}
	}
	return nil
}

// finish hashes the tree exactly as Receive does (minus its refusal of
// symlinks that leave the context) and applies directory modes.
func (f *gitFetcher) finish() (Info, error) {
	excludes, err := f.readIgnoreFile()
	if err != nil {
		return Info{}, err
	}
	info, err := f.x.seal(excludes)
	if err != nil {
		return Info{}, err
	}
	info.Bytes, info.UncompressedBytes, info.Entries, info.Format = f.download, f.stream, f.entries, FormatGit
	return info, nil
}

// readIgnoreFile reads .dockerignore as Receive does; but a symlink to
// outside the context (a monorepo's "svc/.dockerignore ->
// ../.dockerignore"), which an upload cannot hold, is no ignore file:
// BuildKit finds none there either.
func (f *gitFetcher) readIgnoreFile() ([]string, error) {
	if n := f.x.nodes[ignoreFileName]; n != nil && n.typ == typeSymlink {
		t := newTrie(f.x.nodes)
		if l := t.lookup(ignoreFileName); l == nil || t.resolveLink(l).status != resOK {
			return nil, nil
		}
	}
	return f.x.readIgnoreFile(ignoreFileName)
}

// gitFault reports a git command that failed on a repository that was
// fetched: the remote sent something git cannot read, or git broke.
func (f *gitFetcher) gitFault(err error, format string, args ...any) error {
	if f.ctx.Err() != nil {
		return f.ctx.Err()
	}
	return &Error{Class: errdefs.ErrUpstream,
		Msg: fmt.Sprintf(format, args...) + " failed: " + err.Error() + "; retry, and if it persists the repository cannot be used as a context",
		err: fmt.Errorf("%w: %w", ErrGitUnreachable, err)}
}

// classify turns whatever stopped the fetch into the *Error returned.
func (f *gitFetcher) classify(err error) *Error {
	if ctxErr := f.parent.Err(); ctxErr != nil {
		return gitCanceled(ctxErr)
	}
	if errors.Is(f.ctx.Err(), context.DeadlineExceeded) {
		return &Error{Class: errdefs.ErrUpstreamTimeout,
			Msg: fmt.Sprintf("fetching the git context %s at %s did not finish within %s; retry, send the context as a tar, or ask the kiln operator about the git fetch timeout", redactURL(f.g.Remote), f.g.Commit, f.timeout),
			err: context.DeadlineExceeded}
	}
	if f.overDownload.Load() {
		return f.downloadTooLarge()
	}
	if f.overStream {
		return tooLarge("the git context is larger than the %s limit when archived (%s); choose a smaller directory of the repository (#ref:subdir), or ask the kiln operator to raise %s",
			formatBytes(f.lim.MaxUncompressedBytes), keyMaxUncompressedBytes, keyMaxUncompressedBytes)
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{
		Msg: fmt.Sprintf("fetching the git context %s at %s failed: %v; retry later or contact the kiln operator", redactURL(f.g.Remote), f.g.Commit, err),
		err: err}
}

func gitCanceled(err error) *Error {
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Class: errdefs.ErrTimeout, Msg: "fetching the git context took too long and was stopped; retry, or send the context as a tar", err: err}
	}
	return &Error{Class: errdefs.ErrCanceled, Msg: "fetching the git context was canceled", err: err}
}
