package buildcontext

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

// ignoreFileName is the ignore file Receive consults. BuildKit's Dockerfile
// frontend prefers "<Dockerfile>.dockerignore" when it sits next to the
// Dockerfile; the server learns the Dockerfile's path only with the whole
// request, so Info.ForDockerfile rehashes for it then.
const ignoreFileName = ".dockerignore"

// ignorer decides which paths a .dockerignore removes from a context. It is
// a transcription of the walk in github.com/tonistiigi/fsutil (filter.go),
// which is what BuildKit runs when `docker build` / buildx send a context:
//
//   - a path is excluded when patternmatcher's MatchesUsingParentResults says
//     so, carrying match state down from the parent directory;
//   - an excluded directory is not descended into when the patterns contain
//     no "!" exceptions at all, or when every exception is a literal path
//     (no glob characters) that does not lie beneath it;
//   - an excluded directory that has a surviving descendant is still sent,
//     so the descendant has a parent.
//
// Pack and Receive both use it, so the CLI sends what the hash covers and
// the hash covers what BuildKit will see.
type ignorer struct {
	pm *patternmatcher.PatternMatcher // nil: nothing is excluded
	// onlyPrefixExceptions mirrors fsutil's onlyPrefixExcludeExceptions.
	onlyPrefixExceptions bool
}

// parseIgnore turns .dockerignore content into patterns, exactly as
// BuildKit's Dockerfile frontend does (ignorefile.ReadAll).
func parseIgnore(data []byte) ([]string, error) {
	if len(data) == 0 {
		return nil, nil
	}
	return ignorefile.ReadAll(bytes.NewReader(data))
}

func newIgnorer(patterns []string) (*ignorer, error) {
	if len(patterns) == 0 {
		return &ignorer{}, nil
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return nil, fmt.Errorf("invalid pattern in %s: %w", ignoreFileName, err)
	}
	ig := &ignorer{pm: pm, onlyPrefixExceptions: true}
	for _, p := range pm.Patterns() {
		if p.Exclusion() && strings.ContainsAny(patternWithoutTrailingGlob(p), `*[]?^\`) {
			ig.onlyPrefixExceptions = false
			break
		}
	}
	return ig, nil
}

// check classifies one path (slash-separated, relative to the context root).
// parent is the match state of its directory (zero value at the top). It
// returns whether the path itself is excluded, whether a walk should look
// inside it (directories only), and the match state to hand its children.
func (ig *ignorer) check(rel string, isDir bool, parent patternmatcher.MatchInfo) (excluded, descend bool, mi patternmatcher.MatchInfo, err error) {
	if ig.pm == nil {
		return false, isDir, mi, nil
	}
	excluded, mi, err = ig.pm.MatchesUsingParentResults(filepath.FromSlash(rel), parent)
	if err != nil {
		return false, false, mi, fmt.Errorf("match %q against %s: %w", rel, ignoreFileName, err)
	}
	if !isDir {
		return excluded, false, mi, nil
	}
	if !excluded || !ig.onlyPrefixExceptions {
		return excluded, true, mi, nil
	}
	if !ig.pm.Exclusions() {
		return true, false, mi, nil
	}
	dirSlash := filepath.FromSlash(rel) + string(filepath.Separator)
	for _, p := range ig.pm.Patterns() {
		if !p.Exclusion() {
			continue
		}
		if strings.HasPrefix(patternWithoutTrailingGlob(p)+string(filepath.Separator), dirSlash) {
			return true, true, mi, nil
		}
	}
	return true, false, mi, nil
}

func patternWithoutTrailingGlob(p *patternmatcher.Pattern) string {
	s := p.String()
	s = strings.TrimSuffix(s, string(filepath.Separator)+"**")
	s = strings.TrimSuffix(s, string(filepath.Separator)+"*")
	return s
}
