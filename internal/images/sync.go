package images

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/store"
)

// The registry is the source of truth for what a name points at; the
// images table is kiln's index of it (plus which build made a digest).
// SyncRepository brings one repository's rows in line after a client
// pushed or deleted a manifest over HTTP, and Reconcile brings every
// repository in line at start, after a crash between a push and its row.

// SyncRepository makes the image rows of repo say what the registry's
// tags say: a new tag gets a row, a moved tag its new digest (and no
// build, unless the repository is a build's own), a vanished tag loses
// its row. kiln's mirror and cache repositories hold no names.
func (s *Service) SyncRepository(ctx context.Context, repo string) error {
	return s.syncTags(ctx, repo, "")
}

// syncTags syncs one tag of repo, or all of them when tag is empty: a
// push sets one tag, and a repository may have thousands.
func (s *Service) syncTags(ctx context.Context, repo, tag string) error {
	ns := s.policy.Classify(repo)
	switch ns.Class {
	case access.ClassMirror, access.ClassGlobalCache, access.ClassReserved:
		return nil
	}
	tags := []string{tag}
	if tag == "" {
		var err error
		if tags, err = s.reg.Tags(ctx, repo); err != nil && !errors.Is(err, registry.ErrNotFound) {
			return fmt.Errorf("sync image names of %s: %w", repo, err)
		}
	}
	rows, err := store.ListImagesInRepo(ctx, s.db.SQL, repo)
	if err != nil {
		return err
	}
	have := map[string]store.Image{}
	for _, im := range rows {
		if tag == "" || im.Tag == tag {
			have[im.Tag] = im
		}
	}
	var gone []string
	for _, tag := range tags {
		digest, err := s.reg.Resolve(ctx, repo, tag)
		if errors.Is(err, registry.ErrNotFound) {
			continue // untagged meanwhile; the next sync sees it
		}
		if err != nil {
			return fmt.Errorf("sync image names of %s: %w", repo, err)
		}
		old, ok := have[tag]
		delete(have, tag)
		if ok && old.Digest == digest {
			continue
		}
		im := store.Image{Name: repo + ":" + tag, Repository: repo, Tag: tag, Digest: digest, CreatedAt: time.Now().UTC()}
		if ns.Class == access.ClassBuild {
			im.BuildID = ns.Owner
		}
		if err := store.PutImage(ctx, s.db.SQL, im); err != nil {
			return err
		}
		if ok {
			gone = append(gone, old.Digest)
		}
		s.Convert(digest)
	}
	for _, im := range have {
		if err := store.DeleteImage(ctx, s.db.SQL, im.Name); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		gone = append(gone, im.Digest)
	}
	for _, d := range gone {
		s.dropUnnamed(ctx, d)
	}
	return nil
}

// Reconcile syncs every repository that holds names or has rows.
func (s *Service) Reconcile(ctx context.Context) error {
	repos, err := s.reg.Catalog(ctx)
	if err != nil {
		return fmt.Errorf("reconcile image names with the registry: %w", err)
	}
	rows, err := store.ListImages(ctx, s.db.SQL, "")
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, r := range repos {
		seen[r] = true
	}
	for _, im := range rows {
		if !seen[im.Repository] {
			seen[im.Repository] = true
			repos = append(repos, im.Repository)
		}
	}
	for _, r := range repos {
		if err := s.SyncRepository(ctx, r); err != nil {
			return err
		}
	}
	return nil
}
