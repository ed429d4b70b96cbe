package builds

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/distribution/reference"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/store"
)

// platform is the one platform kiln builds for today; it is part of the
// input hash so a multi-platform future cannot collide with it.
const platform = "linux/amd64"

// errNoDedup marks inputs that cannot be hashed safely (a base image
// kiln cannot pin to a digest); such builds simply run.
var errNoDedup = errors.New("inputs cannot be pinned")

// inputHash computes H over everything that determines a build's result,
// from what the host holds:
//
//	sha256( "kiln-input-v1" ‖ context hash ‖ Dockerfile bytes ‖ sorted build args
//	        ‖ target ‖ platform ‖ each base image ref and its digest ‖ builder identity )
//
// every field length-prefixed so no two inputs share an encoding.
func (s *Service) inputHash(ctx context.Context, contextHash string, dockerfile []byte, o storeOptions) (string, []string, error) {
	bases, err := baseImages(dockerfile, o.BuildArgs)
	if err != nil {
		return "", nil, err
	}
	h := sha256.New()
	field := func(v string) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(v)))
		h.Write(n[:])
		h.Write([]byte(v))
	}
	field("kiln-input-v1")
	field(contextHash)
	field(string(dockerfile))
	keys := make([]string, 0, len(o.BuildArgs))
	for k := range o.BuildArgs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	field(fmt.Sprint(len(keys)))
	for _, k := range keys {
		field(k)
		field(o.BuildArgs[k])
	}
	field(o.Target)
	field(platform)
	field(fmt.Sprint(len(bases)))
	var pinned []string
	for _, ref := range bases {
		d, err := s.resolveBase(ctx, ref)
		if err != nil {
			return "", nil, err
		}
		field(ref)
		field(d)
		pinned = append(pinned, ref+"@"+d)
	}
	field(s.cfg.BuilderID)
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), pinned, nil
}

type storeOptions = store.BuildOptions

// baseImages lists the images a Dockerfile's stages start from, with ARGs
// in FROM expanded the way BuildKit expands them (build args over ARG
// defaults), skipping scratch and references to earlier stages.
func baseImages(dockerfile []byte, buildArgs map[string]string) ([]string, error) {
	res, err := parser.Parse(bytes.NewReader(dockerfile))
	if err != nil {
		return nil, err
	}
	stages, metaArgs, err := instructions.Parse(res.AST, nil)
	if err != nil {
		return nil, err
	}
	lex := shell.NewLex(res.EscapeToken)
	var env []string
	for _, cmd := range metaArgs {
		for _, a := range cmd.Args {
			if v, ok := buildArgs[a.Key]; ok {
				env = append(env, a.Key+"="+v)
				continue
			}
			if a.Value == nil {
				continue
			}
			v, _, err := lex.ProcessWord(*a.Value, shell.EnvsFromSlice(env))
			if err != nil {
				return nil, fmt.Errorf("expand ARG %s: %w", a.Key, err)
			}
			env = append(env, a.Key+"="+v)
		}
	}
	seen := map[string]bool{}
	var out []string
	for _, st := range stages {
		base, _, err := lex.ProcessWord(st.BaseName, shell.EnvsFromSlice(env))
		if err != nil {
			return nil, fmt.Errorf("expand FROM %s: %w", st.BaseName, err)
		}
		name := strings.ToLower(base)
		if name != "scratch" && !seen[name] {
			out = append(out, base)
		}
		if st.Name != "" {
			seen[strings.ToLower(st.Name)] = true
		}
	}
	return out, nil
}

// resolveBase pins a base image reference to a manifest digest: a
// reference with a digest is pinned already; one in kiln's own registry
// is resolved there. Anything else cannot be pinned on the host yet.
func (s *Service) resolveBase(ctx context.Context, ref string) (string, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "", fmt.Errorf("%w: base %q: %v", errNoDedup, ref, err)
	}
	if d, ok := named.(reference.Digested); ok {
		return d.Digest().String(), nil
	}
	if reference.Domain(named) != s.cfg.RegistryHost {
		return "", fmt.Errorf("%w: base %q is not in kiln's registry", errNoDedup, ref)
	}
	tag := "latest"
	if t, ok := named.(reference.Tagged); ok {
		tag = t.Tag()
	}
	d, err := s.reg.Resolve(ctx, reference.Path(named), tag)
	if err != nil {
		return "", fmt.Errorf("%w: resolve base %q: %v", errNoDedup, ref, err)
	}
	return d, nil
}

// dedupEligible says whether a build may be answered from an earlier one:
// never with secrets (the result may depend on them), no_cache or pull
// (the user asked for fresh work), or a global cache export (the export
// is the point of the build).
func dedupEligible(o store.BuildOptions) bool {
	return len(o.SecretIDs) == 0 && !o.NoCache && !o.Pull && !o.GlobalCacheExport
}

// findDedup returns the succeeded original build with input hash h that
// finished within the TTL, if any.
func (s *Service) findDedup(ctx context.Context, h, scope string) (Build, bool, error) {
	if s.cfg.DedupTTL <= 0 {
		return Build{}, false, nil
	}
	if s.cfg.DedupAcrossScopes {
		scope = "*"
	}
	b, err := store.FindOriginal(ctx, s.db.SQL, h, time.Now().Add(-s.cfg.DedupTTL), scope)
	if errors.Is(err, store.ErrNotFound) {
		return Build{}, false, nil
	}
	if err != nil {
		return Build{}, false, err
	}
	return b, true, nil
}

// answerFromDedup records b as succeeded at once with orig's digest: its
// names are linked to that digest in the registry; no runtime, BuildKit or
// conversion runs.
func (s *Service) answerFromDedup(ctx context.Context, b *Build, orig Build) error {
	names := append([]string{canonicalName(b.ID)}, b.Tags...)
	for _, name := range names {
		i := strings.LastIndex(name, ":")
		if err := s.reg.Tag(ctx, "builds/"+orig.ID, orig.ImageDigest, name[:i], name[i+1:]); err != nil {
			return fmt.Errorf("link %s to the deduplicated result: %w", name, err)
		}
	}
	now := time.Now().UTC()
	b.Status, b.Phase = store.StatusSucceeded, "done"
	b.DedupOf, b.ImageDigest = orig.ID, orig.ImageDigest
	b.StepsTotal, b.StepsCached = orig.StepsTotal, orig.StepsTotal
	b.StartedAt, b.FinishedAt = now, now
	return nil
}

func (s *Service) dedupEvents(id string, orig Build, h string) {
	s.message(id, "deduplicated: identical inputs (%s) to build %s, which produced %s; nothing was built", h, orig.ID, orig.ImageDigest)
	s.emit(id, Event{Status: store.StatusSucceeded, Event: progress.Event{Kind: KindStatus}})
	s.emit(id, Event{Status: store.StatusSucceeded, Event: progress.Event{Kind: KindEnd}})
}
