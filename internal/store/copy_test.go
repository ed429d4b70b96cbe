package store_test

import (
	"context"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// fill records one of everything kiln keeps.
func fill(t *testing.T, db *store.DB) {
	t.Helper()
	t0 := now()
	for i, id := range []string{"a1", "b2", "c3"} {
		b := mustCreate(t, db.SQL, store.Build{ID: id, Tags: []string{"team/app:" + id}, InputHash: "h" + id,
			ContextBytes: int64(i) << 33, Options: store.BuildOptions{BuildArgs: map[string]string{"K": id}}})
		for j := 0; j < 700; j++ { // more than one insert batch
			if _, err := store.AppendEvent(ctx, db.SQL, b.ID, "log", []byte(`{"line":"x"}`)); err != nil {
				t.Fatal(err)
			}
		}
	}
	store.StartBuild(ctx, db.SQL, "a1", 1, "vm", t0)
	store.FinishBuild(ctx, db.SQL, "a1", store.Outcome{Status: store.StatusSucceeded, ImageDigest: "sha256:x", BuilderReused: true,
		Timings: map[string]float64{"solve": 2}, Check: &store.Check{Warnings: 1}}, t0.Add(time.Second))
	store.StartBuild(ctx, db.SQL, "b2", 1, "vm", t0) // left running: requeued on the next start
	if err := store.PutImage(ctx, db.SQL, store.Image{Name: "team/app:1", Repository: "team/app", Tag: "1", Digest: "sha256:x", BuildID: "a1", CreatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if err := store.PutToken(ctx, db.SQL, store.Token{ID: "tok", Subject: "admin", Tenant: "admin", Scopes: []string{"build:admin"}, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	store.RevokeToken(ctx, db.SQL, "tok", t0)
}

// snapshot reads everything back through the store's API.
func snapshot(t *testing.T, db *store.DB) map[string]any {
	t.Helper()
	builds, err := store.ListBuilds(ctx, db.SQL, store.ListFilter{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]any{"builds": builds}
	for _, b := range builds {
		ev, err := store.Events(ctx, db.SQL, b.ID, 0, 10000)
		if err != nil {
			t.Fatal(err)
		}
		out["events "+b.ID] = ev
	}
	out["images"], _ = store.ListImages(ctx, db.SQL, "")
	out["tokens"], _ = store.ListTokens(ctx, db.SQL)
	return out
}

func TestCopyRecordsSQLiteToPostgres(t *testing.T) {
	pg := testkit.StartPostgres(t)
	src, err := store.Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	fill(t, src)
	target := pg.NewDatabase(t)
	dst, err := store.Open(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()

	counts, err := store.CopyRecords(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	want := []store.TableCount{{"builds", 3}, {"build_events", 2100}, {"images", 1}, {"tokens", 1}}
	if !reflect.DeepEqual(counts, want) {
		t.Errorf("counts %v, want %v (parents before children)", counts, want)
	}
	if a, b := snapshot(t, src), snapshot(t, dst); !reflect.DeepEqual(a, b) {
		t.Errorf("the target reads differently from the source:\n%v\n%v", a, b)
	}
	// Numbering continues where the source left off.
	next := mustCreate(t, dst.SQL, store.Build{ID: "d4"})
	if next.Seq != 4 {
		t.Errorf("the next build has seq %d, want 4", next.Seq)
	}
	if seq, _ := store.AppendEvent(ctx, dst.SQL, "a1", "log", []byte(`{}`)); seq != 701 {
		t.Errorf("the next event has seq %d, want 701", seq)
	}

	// A target that holds records is refused, and left as it was.
	_, err = store.CopyRecords(ctx, src, dst)
	if err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("copy into a used database: %v, want a refusal", err)
	}
	if n, _ := store.ListBuilds(ctx, dst.SQL, store.ListFilter{}); len(n) != 4 {
		t.Fatalf("the refused copy changed the target: %d builds", len(n))
	}
	// And the wrong way round.
	if _, err := store.CopyRecords(ctx, dst, src); err == nil {
		t.Fatal("a copy from PostgreSQL to SQLite ran")
	}
}
