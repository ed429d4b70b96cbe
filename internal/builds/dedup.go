package builds

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/store"
)

// inputHash computes H over everything that determines a build's result,
// from what the host holds:
//
//	sha256( "kiln-input-v1" ‖ context hash ‖ Dockerfile bytes ‖ sorted build args
//	        ‖ target ‖ platforms ‖ each base image ref and its digest ‖ builder identity )
//
// every field length-prefixed so no two inputs share an encoding.
func (s *Service) inputHash(contextHash string, dockerfile []byte, o storeOptions, bases []pinnedBase) string {
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
	field(platformKey(o))
	field(fmt.Sprint(len(bases)))
	for _, b := range bases {
		field(b.ref)
		field(b.digest)
	}
	field(s.cfg.BuilderID)
	// docker build's knobs, after everything else and only when set, so
	// builds without them keep their hashes. Each is named and counted.
	for _, m := range []struct {
		name string
		kv   map[string]string
	}{{"labels", o.Labels}, {"annotations", o.Annotations}} {
		if len(m.kv) == 0 {
			continue
		}
		field(m.name)
		field(fmt.Sprint(len(m.kv)))
		for _, k := range slices.Sorted(maps.Keys(m.kv)) {
			field(k)
			field(m.kv[k])
		}
	}
	for _, l := range []struct {
		name string
		v    []string
	}{{"add_hosts", o.AddHosts}, {"ulimits", o.Ulimits}} {
		if len(l.v) == 0 {
			continue
		}
		field(l.name)
		field(fmt.Sprint(len(l.v)))
		for _, v := range l.v {
			field(v)
		}
	}
	if o.ShmSize > 0 {
		field("shm_size")
		field(fmt.Sprint(o.ShmSize))
	}
	if len(o.Entitlements) > 0 {
		field("entitlements")
		field(strings.Join(o.Entitlements, ","))
	}
	if len(o.NamedContexts) > 0 {
		field("named_contexts")
		field(fmt.Sprint(len(o.NamedContexts)))
		for _, n := range o.NamedContexts {
			field(n.Name)
			field(string(n.Kind))
			field(n.Hash)
		}
	}
	// Attestations change the result (an index with attestation
	// manifests), so they are hashed, only when asked for.
	if o.Provenance != "" {
		field("provenance")
		field(o.Provenance)
	}
	if o.SBOM != nil {
		field("sbom")
		field(o.SBOM.Generator.Digest)
		field(fmt.Sprint(len(o.SBOM.Params)))
		for _, k := range slices.Sorted(maps.Keys(o.SBOM.Params)) {
			field(k)
			field(o.SBOM.Params[k])
		}
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// pinnedBase is one image a build starts from or copies from, with the
// digest it will use.
type pinnedBase struct {
	ref    string        // as the Dockerfile names it, ARGs expanded
	digest string        //
	pin    store.BasePin // where the build finds it, by digest
}

// pinBases resolves every image the Dockerfile uses to a digest: images in
// kiln's registry there, all others through the mirror (the first time
// from their upstream registry; a pull build always asks upstream).
func (s *Service) pinBases(ctx context.Context, p auth.Principal, dockerfile []byte, o storeOptions) ([]pinnedBase, error) {
	// An image index is pinned whole, so one pin serves every platform;
	// only FROM names that differ per platform add pins.
	var refs []string
	for _, target := range targetPlatforms(o) {
		more, err := baseImages(dockerfile, o.BuildArgs, target)
		if err != nil {
			return nil, badRequest("Dockerfile: %v", err)
		}
		for _, r := range more {
			if !slices.Contains(refs, r) {
				refs = append(refs, r)
			}
		}
	}
	if ref := syntaxImage(dockerfile, o.BuildArgs); ref != "" {
		refs = append([]string{ref}, refs...)
	}
	var out []pinnedBase
	user := userContextNames(o)
	for _, ref := range refs {
		named, err := reference.ParseNormalizedNamed(ref)
		if err != nil {
			return nil, badRequest("base image %q is not a valid image reference: %v", ref, err)
		}
		if user[strings.TrimSuffix(reference.FamiliarString(named), ":latest")] {
			continue // the build's own named context replaces it
		}
		pb, err := s.pinImage(ctx, p, ref, o.Pull, "base image")
		if err != nil {
			return nil, err
		}
		out = append(out, pb)
	}
	return out, nil
}

// pinImage resolves an image reference (what it is, for errors: "base
// image") to a digest: in kiln's registry, which the tenant must be able
// to pull from (asked now, so another tenant's image is refused before
// anything is queued), else through the mirror.
func (s *Service) pinImage(ctx context.Context, p auth.Principal, ref string, pull bool, what string) (pinnedBase, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return pinnedBase{}, badRequest("%s %q is not a valid image reference: %v", what, ref, err)
	}
	if reference.Domain(named) == s.cfg.RegistryHost {
		if err := s.policy.Repo(ctx, p, reference.Path(named), access.Pull); err != nil {
			return pinnedBase{}, badRequest("%s %s: %v", what, errdefs.Quote(ref), err)
		}
		d, err := s.resolveLocal(ctx, named)
		if err != nil {
			return pinnedBase{}, badRequest("%s %q: %v; push it to kiln's registry first", what, ref, err)
		}
		return pinnedBase{ref: ref, digest: d, pin: store.BasePin{
			Upstream: ref, LocalRepo: reference.Path(named), Digest: d, Local: true}}, nil
	}
	if s.mirror == nil {
		return pinnedBase{}, badRequest("%s %q is in another registry and this server mirrors none", what, ref)
	}
	pin, err := s.mirror.Resolve(ctx, ref, pull)
	if err != nil {
		return pinnedBase{}, mirrorError(ref, err)
	}
	return pinnedBase{ref: ref, digest: pin.Digest, pin: store.BasePin{
		Upstream: pin.Upstream, LocalRepo: pin.LocalRepo, Digest: pin.Digest, FromUpstream: pin.FromUpstream}}, nil
}

func mirrorError(ref string, err error) error {
	switch {
	case errors.Is(err, mirror.ErrNotFound):
		return badRequest("base image %q was not found in its registry: check the name and tag", ref)
	case errors.Is(err, mirror.ErrUnauthorized):
		return badRequest("base image %q: %v", ref, err)
	default:
		return errdefs.Upstream("base image %q could not be resolved in its registry: %v; retry, or check the server's mirror settings", ref, err)
	}
}

func (s *Service) resolveLocal(ctx context.Context, named reference.Named) (string, error) {
	if d, ok := named.(reference.Digested); ok {
		return d.Digest().String(), nil
	}
	tag := "latest"
	if t, ok := named.(reference.Tagged); ok {
		tag = t.Tag()
	}
	return s.reg.Resolve(ctx, reference.Path(named), tag)
}

type storeOptions = store.BuildOptions

// syntaxImage is the frontend image a build runs instead of BuildKit's
// built-in Dockerfile frontend: the BUILDKIT_SYNTAX build arg, else the
// Dockerfile's "# syntax=" line. It is pinned like a base image, so it
// comes through kiln's mirror, by digest, and is part of the input hash;
// BuildKit finds the pin among the build's named contexts.
func syntaxImage(dockerfile []byte, buildArgs map[string]string) string {
	if v := strings.TrimSpace(buildArgs["BUILDKIT_SYNTAX"]); v != "" {
		ref, _, _ := strings.Cut(v, " ")
		return ref
	}
	if ref, _, _, ok := parser.DetectSyntax(dockerfile); ok {
		return ref
	}
	return ""
}

// baseImages lists the images a Dockerfile uses for target — FROM, COPY
// --from and RUN --mount from= — with ARGs expanded the way BuildKit
// expands them in FROM (build args over ARG defaults), skipping scratch
// and stages.
func baseImages(dockerfile []byte, buildArgs map[string]string, target string) ([]string, error) {
	res, err := parser.Parse(bytes.NewReader(dockerfile))
	if err != nil {
		return nil, err
	}
	stages, metaArgs, err := instructions.Parse(res.AST, nil)
	if err != nil {
		return nil, err
	}
	lex := shell.NewLex(res.EscapeToken)
	// BuildKit's automatic platform args, as it sets them for target, so
	// FROM alpine-${TARGETARCH} is pinned too.
	env := platformArgs(target)
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
	stageNames := map[string]bool{}
	added := map[string]bool{}
	var out []string
	add := func(word string, what string) error {
		ref, _, err := lex.ProcessWord(word, shell.EnvsFromSlice(env))
		if err != nil {
			return fmt.Errorf("expand %s %s: %w", what, word, err)
		}
		name := strings.ToLower(ref)
		if name == "" || name == "scratch" || stageNames[name] || added[name] {
			return nil
		}
		if _, err := strconv.Atoi(name); err == nil {
			return nil // COPY --from=0: a stage index
		}
		added[name] = true
		out = append(out, ref)
		return nil
	}
	for _, st := range stages {
		if err := add(st.BaseName, "FROM"); err != nil {
			return nil, err
		}
		for _, cmd := range st.Commands {
			switch c := cmd.(type) {
			case *instructions.CopyCommand:
				if c.From != "" {
					if err := add(c.From, "COPY --from"); err != nil {
						return nil, err
					}
				}
			case *instructions.RunCommand:
				for _, m := range instructions.GetMounts(c) {
					if m.From != "" {
						if err := add(m.From, "RUN --mount from"); err != nil {
							return nil, err
						}
					}
				}
			}
		}
		if st.Name != "" {
			stageNames[strings.ToLower(st.Name)] = true
		}
	}
	return out, nil
}

// dedupEligible says whether a build may be answered from an earlier one:
// never with secrets (the result may depend on them), no_cache or pull
// (the user asked for fresh work), or a cache export or a push to another
// registry (the export or the push is the point of the build). Nor with
// ssh agents: a step with an agent typically fetches what its keys grant
// (a private repository at whatever its branch holds now), which no
// input hash covers, and an answer from another build would hand this
// one a result made with someone else's access; as with secrets, the
// ids alone say nothing about what the agent holds.
func dedupEligible(o store.BuildOptions) bool {
	return len(o.SecretIDs) == 0 && len(o.SSH) == 0 && !o.NoCache && !o.Pull && !o.GlobalCacheExport &&
		len(o.ExternalPush) == 0 && o.CacheTo == nil && o.Call == ""
}

// findDedup returns the succeeded original build with input hash h that
// finished within the TTL, if any. It looks among the tenant's own builds
// and, unless the build may use cache mounts (whose contents the hash
// cannot see, so another tenant's could have tainted the result), those
// of the tenants its trust group names.
func (s *Service) findDedup(ctx context.Context, h, tenant string, cacheMounts bool) (Build, bool, error) {
	if s.cfg.DedupTTL <= 0 {
		return Build{}, false, nil
	}
	b, err := store.FindOriginal(ctx, s.db.SQL, h, time.Now().Add(-s.cfg.DedupTTL), s.dedupPeers(tenant, cacheMounts))
	if errors.Is(err, store.ErrNotFound) {
		return Build{}, false, nil
	}
	if err != nil {
		return Build{}, false, err
	}
	return b, true, nil
}

// dedupPeers are the tenants whose identical builds may answer one of
// tenant's: itself and its trust group, or only itself when the build
// may use cache mounts.
func (s *Service) dedupPeers(tenant string, cacheMounts bool) []string {
	if cacheMounts {
		return []string{tenant}
	}
	return s.policy.TrustedTenants(tenant)
}

// findInFlight returns an identical build, by the same rules as dedup,
// that is queued or running: a build submitted meanwhile waits for it
// instead of running the same steps again.
func (s *Service) findInFlight(ctx context.Context, q store.Querier, h, tenant string, cacheMounts bool, except string) (Build, bool, error) {
	if s.cfg.DedupTTL <= 0 {
		return Build{}, false, nil
	}
	b, err := store.FindInFlight(ctx, q, h, s.dedupPeers(tenant, cacheMounts), except)
	if errors.Is(err, store.ErrNotFound) {
		return Build{}, false, nil
	}
	if err != nil {
		return Build{}, false, err
	}
	return b, true, nil
}

// errDedupGone: the original's image is no longer in the registry under
// any name (its names were deleted and a registry GC ran), so the hit
// cannot be answered and the build must run.
var errDedupGone = errors.New("the deduplicated build's image is gone from the registry")

// answerFromDedup records b as succeeded at once with orig's digest: its
// names are linked to that digest in the registry; no runtime, BuildKit or
// conversion runs.
func (s *Service) answerFromDedup(ctx context.Context, b *Build, orig Build) error {
	src, err := s.dedupSource(ctx, orig)
	if err != nil {
		return err
	}
	names := append([]string{canonicalName(b.ID)}, b.Tags...)
	for _, name := range names {
		i := strings.LastIndex(name, ":")
		if err := s.reg.Tag(ctx, src, orig.ImageDigest, name[:i], name[i+1:]); err != nil {
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

// dedupSource finds a repository that still holds orig's image: its own
// builds/<id>, else any other name of the digest.
func (s *Service) dedupSource(ctx context.Context, orig Build) (string, error) {
	repos := []string{"builds/" + orig.ID}
	others, err := store.ListImages(ctx, s.db.SQL, orig.ImageDigest)
	if err != nil {
		return "", fmt.Errorf("look up names of %s: %w", orig.ImageDigest, err)
	}
	for _, im := range others {
		if i := strings.LastIndex(im.Name, ":"); i > 0 {
			repos = append(repos, im.Name[:i])
		}
	}
	for _, repo := range repos {
		_, _, _, err := s.reg.Manifest(ctx, repo, orig.ImageDigest)
		if err == nil {
			return repo, nil
		}
		if !errors.Is(err, registry.ErrNotFound) {
			return "", fmt.Errorf("look up the deduplicated result in %s: %w", repo, err)
		}
	}
	return "", errDedupGone
}

// dedupAnswered follows up a build recorded as answered by orig: its
// digest's conversion (a no-op: converted already, or converting), its
// closing events and the metrics.
func (s *Service) dedupAnswered(b Build, orig Build) {
	s.images.Convert(b.ImageDigest)
	s.message(b.ID, "deduplicated: identical inputs (%s) to build %s, which produced %s; nothing was built", b.InputHash, orig.ID, orig.ImageDigest)
	s.emit(b.ID, Event{Status: store.StatusSucceeded, Event: progress.Event{Kind: KindStatus}})
	s.emit(b.ID, Event{Status: store.StatusSucceeded, Event: progress.Event{Kind: KindEnd}})
	s.metrics.dedupHit()
	s.metrics.finished(b.ID, store.Outcome{Status: store.StatusSucceeded})
}

// awaitLeader waits, holding no volume and no slot, for the identical
// build b follows. When that one succeeded, b is answered with its result
// at once and awaitLeader reports true; when it failed, was canceled or
// is gone, b runs itself.
func (s *Service) awaitLeader(ctx context.Context, b Build) bool {
	id := b.Options.Follows
	wake, stop := s.hub.subscribe(id)
	defer stop()
	s.phase(b.ID, "waiting for identical build "+id)
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		leader, err := s.load(ctx, id)
		switch {
		case err != nil:
			s.message(b.ID, "identical build %s cannot be followed (%v); building this one", id, err)
			return false
		case leader.Status == store.StatusSucceeded:
			if err := s.answerFollower(ctx, b, leader); err != nil {
				s.message(b.ID, "taking the result of identical build %s failed (%v); building this one", id, err)
				return false
			}
			return true
		case store.Terminal(leader.Status):
			s.message(b.ID, "identical build %s %s; building this one", id, leader.Status)
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-wake:
		case <-tick.C:
		}
	}
}

// answerFollower finishes b with the result of the identical build
// leader (or of the original leader was itself answered by).
func (s *Service) answerFollower(ctx context.Context, b Build, leader Build) error {
	orig := leader
	if leader.DedupOf != "" {
		if o, err := s.load(ctx, leader.DedupOf); err == nil {
			orig = o
		}
	}
	if err := s.answerFromDedup(ctx, &b, orig); err != nil {
		return err
	}
	var won bool
	err := s.db.InTx(ctx, func(tx *sql.Tx) error {
		var err error
		if won, err = store.FinishDeduped(ctx, tx, b); err != nil || !won {
			return err
		}
		return putImages(ctx, tx, b, b.ImageDigest)
	})
	if err != nil || !won {
		return err // canceled meanwhile: the cancel wrote the end
	}
	s.secrets.Delete(b.ID)
	s.dedupAnswered(b, orig)
	return nil
}
