package buildcontext

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/moby/buildkit/frontend/dockerfile/dfgitutil"
)

// GitContext is a git URL given as a build context, as docker buildx
// spells it: https://host/org/repo.git#ref:subdir, git@host:org/repo.git,
// ssh://…, git://…, http://… (discouraged, but BuildKit takes it).
type GitContext struct {
	Remote string // the repository, without the #fragment
	Ref    string // branch, tag or commit; empty means the remote's HEAD
	SubDir string // the context's directory inside the repository; "" is its root
	// Commit is the full commit id Ref resolved to (ResolveGit).
	Commit string
}

var commitPattern = regexp.MustCompile(`^[0-9a-f]{40}([0-9a-f]{24})?$`)

// ParseGitContext parses a git URL with BuildKit's own parser, so kiln
// reads it exactly as the builder will, and refuses what a build's context
// must not be: a local path, a file:// URL, an option-looking remote, or
// URL options kiln does not carry over (keep-git-dir, submodules, ...).
func ParseGitContext(s string) (GitContext, error) {
	if strings.TrimSpace(s) == "" {
		return GitContext{}, errors.New("the git URL is empty")
	}
	if strings.ContainsAny(s, "\x00\n\r") {
		return GitContext{}, errors.New("the git URL has a control character")
	}
	g, isGit, err := dfgitutil.ParseGitRef(s)
	if err != nil || !isGit || g == nil {
		return GitContext{}, fmt.Errorf("%q is not a git URL kiln can fetch: use https://host/org/repo.git#ref:subdir or git@host:org/repo.git", s)
	}
	remote := g.Remote
	if g.IndistinguishableFromLocal {
		remote = "https://" + remote
	}
	ok := false
	for _, p := range []string{"https://", "http://", "ssh://", "git://"} {
		ok = ok || strings.HasPrefix(remote, p)
	}
	if !ok && !scpLike.MatchString(remote) {
		return GitContext{}, fmt.Errorf("git URL %q: only https://, http://, ssh://, git:// and user@host:path remotes are fetched", s)
	}
	if g.KeepGitDir != nil || g.Submodules != nil || g.MTime != "" || g.Checksum != "" || g.FetchByCommit {
		return GitContext{}, fmt.Errorf("git URL %q: kiln takes only #ref:subdir (or ?ref=&subdir=); drop the other options", s)
	}
	sub := g.SubDir
	if sub != "" {
		for _, seg := range strings.Split(sub, "/") {
			if seg == ".." {
				return GitContext{}, fmt.Errorf("git URL %q: the subdirectory must be a path inside the repository", s)
			}
		}
		sub = path.Clean("/" + sub)[1:]
	}
	if strings.HasPrefix(g.Ref, "-") {
		return GitContext{}, fmt.Errorf("git URL %q: invalid ref %q", s, g.Ref)
	}
	return GitContext{Remote: remote, Ref: g.Ref, SubDir: sub}, nil
}

// scpLike is git's user@host:path form.
var scpLike = regexp.MustCompile(`^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:[^/-]`)

// Pinned is the URL BuildKit is given: the repository at the resolved
// commit, so what the build sees is what the input hash names.
func (g GitContext) Pinned() string {
	u := g.Remote + "#" + g.Commit
	if g.SubDir != "" {
		u += ":" + g.SubDir
	}
	return u
}

// Hash is the context's hash for dedup: the commit names the whole
// tree, the subdirectory the part of it that is the context.
func (g GitContext) Hash() string {
	return "git:" + g.Commit + ":" + g.SubDir
}

// ErrGitUnreachable wraps a failed ls-remote: the server could not reach
// the repository or find the ref.
var ErrGitUnreachable = errors.New("git repository unreachable")

// ResolveGit finds the commit g.Ref names on the remote with git
// ls-remote (a commit id is taken as it is), within timeout. Git never
// prompts, and only network transports are allowed.
func ResolveGit(ctx context.Context, g GitContext, timeout time.Duration) (GitContext, error) {
	if commitPattern.MatchString(g.Ref) {
		g.Commit = g.Ref
		return g, nil
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	args := []string{"-c", "protocol.file.allow=never", "ls-remote", "--", g.Remote}
	if g.Ref == "" {
		args = append(args, "HEAD")
	} else {
		// An annotated tag's commit is listed as <tag>^{}, which the
		// pattern <tag> alone does not match.
		args = append(args, g.Ref, g.Ref+"^{}")
	}
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Env = append(os.Environ(),
		"GIT_TERMINAL_PROMPT=0",
		"GIT_ASKPASS=/bin/false",
		"SSH_ASKPASS=/bin/false",
		"GIT_SSH_COMMAND=ssh -o BatchMode=yes -o ConnectTimeout=10",
		"GIT_ALLOW_PROTOCOL=https:http:ssh:git",
		"GIT_CONFIG_NOSYSTEM=1",
	)
	killGroupOnCancel(cmd)
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() == context.DeadlineExceeded {
		return g, fmt.Errorf("%w: git ls-remote %s did not answer within %s", ErrGitUnreachable, g.Remote, timeout)
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 500 {
			msg = msg[:500] + "…"
		}
		if msg == "" {
			msg = err.Error()
		}
		return g, fmt.Errorf("%w: git ls-remote %s: %s", ErrGitUnreachable, g.Remote, msg)
	}
	commit := pickRef(stdout.Bytes(), g.Ref)
	if commit == "" {
		what := "HEAD"
		if g.Ref != "" {
			what = fmt.Sprintf("no branch or tag %q", g.Ref)
		}
		return g, fmt.Errorf("%w: %s has %s", ErrGitUnreachable, g.Remote, what)
	}
	g.Commit = commit
	return g, nil
}

// pickRef chooses among ls-remote's lines the one ref names, as git
// checkout would: HEAD, a full ref, a branch, then a tag (peeled to its
// commit).
func pickRef(out []byte, ref string) string {
	refs := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		id, name, ok := strings.Cut(sc.Text(), "\t")
		if ok && commitPattern.MatchString(id) {
			refs[name] = id
		}
	}
	if ref == "" {
		return refs["HEAD"]
	}
	for _, name := range []string{ref + "^{}", ref, "refs/heads/" + ref, "refs/tags/" + ref + "^{}", "refs/tags/" + ref} {
		if id, ok := refs[name]; ok {
			return id
		}
	}
	return ""
}
