package store_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// The store conformance suite: one set of behavioural tests that every
// backend must pass, run against SQLite and PostgreSQL alike (in the
// manner of containerd's snapshotter test suite). A case gets a fresh,
// empty database from newDB.
var conformance = []struct {
	name string
	fn   func(t *testing.T, newDB func(t *testing.T) (*store.DB, string))
}{
	{"Migrations", testMigrations},
	{"BuildRoundTrip", testBuildRoundTrip},
	{"ListBuilds", testListBuilds},
	{"BuildLifecycle", testBuildLifecycle},
	{"QueuePositions", testQueuePositions},
	{"DedupLookups", testDedupLookups},
	{"Events", testEvents},
	{"Images", testImages},
	{"Tokens", testTokens},
	{"InTxRollback", testInTxRollback},
	{"QueueJobInBuildTransaction", testQueueJobInBuildTransaction},
	{"ExactlyOneLeader", testExactlyOneLeader},
	{"ConcurrentNumbering", testConcurrentNumbering},
}

func TestConformance(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) {
		runConformance(t, func(t *testing.T) string { return filepath.Join(t.TempDir(), "kiln.db") })
	})
	t.Run("postgres", func(t *testing.T) {
		pg := testkit.StartPostgres(t)
		runConformance(t, func(t *testing.T) string { return pg.NewDatabase(t) })
	})
}

func runConformance(t *testing.T, newLocation func(t *testing.T) string) {
	for _, c := range conformance {
		t.Run(c.name, func(t *testing.T) {
			c.fn(t, func(t *testing.T) (*store.DB, string) {
				loc := newLocation(t)
				db, err := store.Open(context.Background(), loc)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { db.Close() })
				return db, loc
			})
		})
	}
}

var ctx = context.Background()

// now is a time both backends keep exactly (microseconds).
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

func mustCreate(t *testing.T, q store.Querier, b store.Build) store.Build {
	t.Helper()
	if b.Subject == "" {
		b.Subject = "alice"
	}
	if b.Tenant == "" {
		b.Tenant = "team"
	}
	if b.Status == "" {
		b.Status = store.StatusQueued
	}
	if b.Attempt == 0 {
		b.Attempt = 1
	}
	if b.CreatedAt.IsZero() {
		b.CreatedAt = now()
	}
	if err := store.CreateBuild(ctx, q, &b); err != nil {
		t.Fatal(err)
	}
	return b
}

func ids(bs []store.Build) []string {
	out := []string{}
	for _, b := range bs {
		out = append(out, b.ID)
	}
	return out
}

func testMigrations(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, loc := newDB(t)
	v, err := db.SchemaVersion(ctx)
	if err != nil || v < 5 {
		t.Fatalf("schema version %d, %v; want at least 5", v, err)
	}
	mustCreate(t, db.SQL, store.Build{ID: "b1"})
	// Opening again (a restart, or a second node) changes nothing.
	for i := 0; i < 2; i++ {
		again, err := store.Open(ctx, loc)
		if err != nil {
			t.Fatalf("reopen: %v", err)
		}
		v2, err := again.SchemaVersion(ctx)
		if err != nil || v2 != v {
			t.Fatalf("after reopening, schema version %d, %v; want %d", v2, err, v)
		}
		if _, err := store.GetBuild(ctx, again.SQL, "b1"); err != nil {
			t.Fatalf("after reopening: %v", err)
		}
		again.Close()
	}
	var n int
	if err := db.SQL.QueryRowContext(ctx, `SELECT COUNT(*) FROM kiln_migrations`).Scan(&n); err != nil || n != v {
		t.Fatalf("%d migrations recorded (%v), want %d", n, err, v)
	}
}

func testBuildRoundTrip(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	created := now()
	in := store.Build{ID: "b1", Status: store.StatusQueued, Phase: "queued", Subject: "alice", Tenant: "team",
		CacheScope: "team.web", Tags: []string{"team/app:1", "team/app:latest"}, InputHash: "sha256:h",
		Options: store.BuildOptions{DockerfilePath: "Dockerfile", BuildArgs: map[string]string{"A": "1"},
			SecretIDs: []string{"npm"}, Follows: "b0", Bases: []store.BasePin{{Upstream: "docker.io/library/x:1", Digest: "sha256:d"}}},
		ContextBytes: 5 << 30, // more than 32 bits
		Attempt:      1, CreatedAt: created}
	b := in
	if err := store.CreateBuild(ctx, db.SQL, &b); err != nil {
		t.Fatal(err)
	}
	if b.Seq != 1 {
		t.Errorf("first build has seq %d, want 1", b.Seq)
	}
	got, err := store.GetBuild(ctx, db.SQL, "b1")
	if err != nil {
		t.Fatal(err)
	}
	in.Seq, in.Timings = 1, nil
	got.Timings = nil
	if !reflect.DeepEqual(got, in) {
		t.Errorf("read back\n%+v\nwant\n%+v", got, in)
	}
	if _, err := store.GetBuild(ctx, db.SQL, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("missing build: %v, want ErrNotFound", err)
	}
	dup := store.Build{ID: "b1", Status: store.StatusQueued, Subject: "s", Attempt: 1, CreatedAt: created}
	if err := store.CreateBuild(ctx, db.SQL, &dup); err == nil {
		t.Error("a second build with the same id was recorded")
	}
	b2 := mustCreate(t, db.SQL, store.Build{ID: "b2"})
	if b2.Seq != 2 {
		t.Errorf("second build has seq %d, want 2", b2.Seq)
	}
}

func testListBuilds(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	// Ids are lower-case base32; prefixes are matched in byte order.
	for _, b := range []store.Build{
		{ID: "abc2", Tenant: "a", InputHash: "h1"},
		{ID: "abc7", Tenant: "b", InputHash: "h1", Status: store.StatusRunning},
		{ID: "abd", Tenant: "a", InputHash: "h2"},
		{ID: "ab", Tenant: "a"},
		{ID: "abcz", Tenant: "a", Status: store.StatusFailed},
	} {
		mustCreate(t, db.SQL, b)
	}
	for _, c := range []struct {
		f    store.ListFilter
		want []string
	}{
		{store.ListFilter{}, []string{"abcz", "ab", "abd", "abc7", "abc2"}},
		{store.ListFilter{Tenant: "a"}, []string{"abcz", "ab", "abd", "abc2"}},
		{store.ListFilter{Status: store.StatusQueued}, []string{"ab", "abd", "abc2"}},
		{store.ListFilter{InputHash: "h1"}, []string{"abc7", "abc2"}},
		{store.ListFilter{IDPrefix: "abc"}, []string{"abcz", "abc7", "abc2"}},
		{store.ListFilter{IDPrefix: "abc", Tenant: "a"}, []string{"abcz", "abc2"}},
		{store.ListFilter{IDPrefix: "ab"}, []string{"abcz", "ab", "abd", "abc7", "abc2"}},
		{store.ListFilter{IDPrefix: "x"}, []string{}},
		{store.ListFilter{Limit: 2}, []string{"abcz", "ab"}},
		{store.ListFilter{BeforeSeq: 4, Limit: 2}, []string{"abd", "abc7"}},
	} {
		got, err := store.ListBuilds(ctx, db.SQL, c.f)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ids(got), c.want) {
			t.Errorf("%+v: %v, want %v", c.f, ids(got), c.want)
		}
	}
}

func testBuildLifecycle(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	mustCreate(t, db.SQL, store.Build{ID: "a", CacheScope: "team"})
	mustCreate(t, db.SQL, store.Build{ID: "b"})
	mustCreate(t, db.SQL, store.Build{ID: "c"})
	start := now()
	if ok, err := store.StartBuild(ctx, db.SQL, "a", 2, "process", start); err != nil || ok {
		t.Fatalf("start at a stale attempt: %v, %v; want false", ok, err)
	}
	if ok, err := store.StartBuild(ctx, db.SQL, "a", 1, "process", start); err != nil || !ok {
		t.Fatalf("start: %v, %v", ok, err)
	}
	if ok, _ := store.StartBuild(ctx, db.SQL, "a", 1, "process", start); ok {
		t.Fatal("a running build started again")
	}
	if err := store.SetPhase(ctx, db.SQL, "a", "solving"); err != nil {
		t.Fatal(err)
	}
	if err := store.SetSteps(ctx, db.SQL, "a", 7, 3); err != nil {
		t.Fatal(err)
	}
	a, _ := store.GetBuild(ctx, db.SQL, "a")
	if a.Status != store.StatusRunning || a.Phase != "solving" || a.StepsTotal != 7 || a.StepsCached != 3 ||
		a.Runtime != "process" || !a.StartedAt.Equal(start) {
		t.Fatalf("running build reads %+v", a)
	}
	if tenant, active, err := store.BuildOwner(ctx, db.SQL, "a"); err != nil || tenant != "team" || !active {
		t.Fatalf("owner: %q %v %v", tenant, active, err)
	}
	if got, _ := store.Unfinished(ctx, db.SQL); !reflect.DeepEqual(ids(got), []string{"a", "b", "c"}) {
		t.Fatalf("unfinished: %v", ids(got))
	}

	// Requeue: a new attempt, queued again, steps and start cleared.
	attempt, err := store.Requeue(ctx, db.SQL, "a")
	if err != nil || attempt != 2 {
		t.Fatalf("requeue: %d, %v", attempt, err)
	}
	a, _ = store.GetBuild(ctx, db.SQL, "a")
	if a.Status != store.StatusQueued || a.Attempt != 2 || !a.StartedAt.IsZero() || a.StepsTotal != 0 {
		t.Fatalf("requeued build reads %+v", a)
	}
	if ok, _ := store.StartBuild(ctx, db.SQL, "a", 1, "process", start); ok {
		t.Fatal("the old attempt started a requeued build")
	}
	if ok, _ := store.StartBuild(ctx, db.SQL, "a", 2, "vm", start); !ok {
		t.Fatal("the new attempt could not start")
	}

	// Finish: exactly once; the outcome is kept whole.
	end := now()
	o := store.Outcome{Status: store.StatusSucceeded, Phase: "done", ImageDigest: "sha256:img", StepsTotal: 9, StepsCached: 4,
		BuilderReused: true, Timings: map[string]float64{store.TimingSolve: 1.5}, Check: &store.Check{Warnings: 2, Report: "r"}}
	if won, err := store.FinishBuild(ctx, db.SQL, "a", o, end); err != nil || !won {
		t.Fatalf("finish: %v, %v", won, err)
	}
	if won, err := store.FinishBuild(ctx, db.SQL, "a", store.Outcome{Status: store.StatusCanceled}, end); err != nil || won {
		t.Fatalf("finishing twice: %v, %v; want false", won, err)
	}
	a, _ = store.GetBuild(ctx, db.SQL, "a")
	if a.Status != store.StatusSucceeded || a.ImageDigest != "sha256:img" || a.StepsTotal != 9 || a.StepsCached != 4 ||
		!a.BuilderReused || a.Timings[store.TimingSolve] != 1.5 || a.Check == nil || a.Check.Warnings != 2 ||
		!a.FinishedAt.Equal(end) {
		t.Fatalf("finished build reads %+v", a)
	}
	if _, err := store.Requeue(ctx, db.SQL, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("requeue of a finished build: %v, want ErrNotFound", err)
	}
	if _, active, _ := store.BuildOwner(ctx, db.SQL, "a"); active {
		t.Fatal("a finished build is active")
	}
	if _, _, err := store.BuildOwner(ctx, db.SQL, "zz"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("owner of a missing build: %v", err)
	}
	store.FinishBuild(ctx, db.SQL, "b", store.Outcome{Status: store.StatusFailed, Error: "boom"}, end)
	if got, _ := store.Unfinished(ctx, db.SQL); !reflect.DeepEqual(ids(got), []string{"c"}) {
		t.Fatalf("unfinished: %v", ids(got))
	}
	counts, err := store.CountByStatus(ctx, db.SQL)
	if err != nil || !reflect.DeepEqual(counts, map[string]int{"succeeded": 1, "failed": 1, "queued": 1}) {
		t.Fatalf("counts %v, %v", counts, err)
	}
}

// Queue positions are unique at any moment and say when a build will
// start: builds holding their volume and waiting for a slot first, then
// builds still waiting for their cache scope; a build no longer queued
// has none, whatever copy of it the caller holds.
func testQueuePositions(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	add := func(id, scope, status string) {
		mustCreate(t, db.SQL, store.Build{ID: id, Status: status, CacheScope: scope})
	}
	add("r", "s", store.StatusRunning)
	add("s2", "s", store.StatusQueued) // waits for scope s
	add("s3", "s", store.StatusQueued)
	for _, id := range []string{"t4", "t5", "t6"} {
		add(id, id, store.StatusQueued)
		if err := store.EnterSlotLine(ctx, db.SQL, id, 1); err != nil {
			t.Fatal(err)
		}
	}
	check := func(want map[string]int) {
		t.Helper()
		seen := map[int]string{}
		for id, w := range want {
			got, err := store.QueuePosition(ctx, db.SQL, id)
			if err != nil {
				t.Fatal(err)
			}
			if got != w {
				t.Errorf("%s: position %d, want %d", id, got, w)
			}
			if other, dup := seen[got]; dup && got != 0 {
				t.Errorf("%s and %s share position %d", id, other, got)
			}
			seen[got] = id
		}
	}
	check(map[string]int{"r": 0, "t4": 1, "t5": 2, "t6": 3, "s2": 4, "s3": 5})
	if ok, err := store.StartBuild(ctx, db.SQL, "t4", 1, "process", now()); err != nil || !ok {
		t.Fatal(ok, err)
	}
	check(map[string]int{"t4": 0, "t5": 1, "t6": 2, "s2": 3, "s3": 4})
	// Getting in line twice keeps the first place; a requeued build
	// starts over behind the slot line.
	if err := store.EnterSlotLine(ctx, db.SQL, "t5", 1); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Requeue(ctx, db.SQL, "t6"); err != nil {
		t.Fatal(err)
	}
	check(map[string]int{"t5": 1, "s2": 2, "s3": 3, "t6": 4})
}

func testDedupLookups(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	t0 := now()
	finish := func(id, digest string, at time.Time) {
		t.Helper()
		if won, err := store.FinishBuild(ctx, db.SQL, id, store.Outcome{Status: store.StatusSucceeded, ImageDigest: digest, StepsTotal: 3}, at); err != nil || !won {
			t.Fatal(won, err)
		}
	}
	mustCreate(t, db.SQL, store.Build{ID: "old", InputHash: "h", Tenant: "a"})
	finish("old", "sha256:1", t0.Add(-2*time.Hour))
	mustCreate(t, db.SQL, store.Build{ID: "orig", InputHash: "h", Tenant: "a"})
	finish("orig", "sha256:2", t0)
	mustCreate(t, db.SQL, store.Build{ID: "other", InputHash: "h", Tenant: "b"})
	finish("other", "sha256:3", t0.Add(time.Second))
	mustCreate(t, db.SQL, store.Build{ID: "fly1", InputHash: "h", Tenant: "a"})
	mustCreate(t, db.SQL, store.Build{ID: "fly2", InputHash: "h", Tenant: "a", Status: store.StatusRunning})

	got, err := store.FindOriginal(ctx, db.SQL, "h", t0.Add(-time.Hour), []string{"a"})
	if err != nil || got.ID != "orig" {
		t.Fatalf("original: %s, %v; want orig", got.ID, err)
	}
	if got, _ := store.FindOriginal(ctx, db.SQL, "h", t0.Add(-time.Hour), []string{"a", "b"}); got.ID != "other" {
		t.Fatalf("original across a trust group: %s, want other", got.ID)
	}
	if _, err := store.FindOriginal(ctx, db.SQL, "h", t0.Add(time.Hour), []string{"a"}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("original past the TTL: %v", err)
	}
	if _, err := store.FindOriginal(ctx, db.SQL, "h", t0.Add(-time.Hour), nil); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("original without tenants: %v", err)
	}
	if got, err := store.FindInFlight(ctx, db.SQL, "h", []string{"a"}, ""); err != nil || got.ID != "fly1" {
		t.Fatalf("in flight: %s, %v; want fly1", got.ID, err)
	}
	if got, _ := store.FindInFlight(ctx, db.SQL, "h", []string{"a"}, "fly1"); got.ID != "fly2" {
		t.Fatalf("in flight except fly1: %s, want fly2", got.ID)
	}
	if _, err := store.FindInFlight(ctx, db.SQL, "h", []string{"b"}, ""); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("in flight for another tenant: %v", err)
	}
	// A follower takes the original's result.
	orig, _ := store.GetBuild(ctx, db.SQL, "orig")
	f := store.Build{ID: "fly1", DedupOf: "orig", ImageDigest: orig.ImageDigest, StepsTotal: orig.StepsTotal,
		StartedAt: t0, FinishedAt: t0.Add(time.Minute)}
	if won, err := store.FinishDeduped(ctx, db.SQL, f); err != nil || !won {
		t.Fatal(won, err)
	}
	if won, _ := store.FinishDeduped(ctx, db.SQL, f); won {
		t.Fatal("a deduplicated build finished twice")
	}
	got, _ = store.GetBuild(ctx, db.SQL, "fly1")
	if got.Status != store.StatusSucceeded || got.DedupOf != "orig" || got.ImageDigest != "sha256:2" || !got.FinishedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("deduplicated build reads %+v", got)
	}
	// A deduplicated build never answers others itself.
	if got, _ := store.FindOriginal(ctx, db.SQL, "h", t0.Add(-time.Hour), []string{"a"}); got.ID != "orig" {
		t.Fatalf("original after a dedup: %s, want orig", got.ID)
	}
}

func testEvents(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	mustCreate(t, db.SQL, store.Build{ID: "a"})
	mustCreate(t, db.SQL, store.Build{ID: "b"})
	for i := 1; i <= 5; i++ {
		seq, err := store.AppendEvent(ctx, db.SQL, "a", "log", []byte(fmt.Sprintf(`{"n":%d}`, i)))
		if err != nil || seq != int64(i) {
			t.Fatalf("append %d: seq %d, %v", i, seq, err)
		}
	}
	if seq, _ := store.AppendEvent(ctx, db.SQL, "b", "status", []byte(`{}`)); seq != 1 {
		t.Fatalf("first event of another build has seq %d", seq)
	}
	got, err := store.Events(ctx, db.SQL, "a", 2, 2)
	if err != nil || len(got) != 2 || got[0].Seq != 3 || got[1].Seq != 4 || string(got[0].Data) != `{"n":3}` || got[0].Kind != "log" {
		t.Fatalf("events after 2: %+v, %v", got, err)
	}
	if got, _ := store.Events(ctx, db.SQL, "a", 5, 10); len(got) != 0 {
		t.Fatalf("events after the last: %+v", got)
	}
	if _, err := store.AppendEvent(ctx, db.SQL, "missing", "log", []byte(`{}`)); err == nil {
		t.Fatal("an event of a build that does not exist was stored")
	}
}

func testImages(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	t0 := now()
	put := func(name, repo, tag, digest string) {
		t.Helper()
		if err := store.PutImage(ctx, db.SQL, store.Image{Name: name, Repository: repo, Tag: tag, Digest: digest, BuildID: "b", CreatedAt: t0}); err != nil {
			t.Fatal(err)
		}
	}
	put("team/app:1", "team/app", "1", "sha256:a")
	put("team/app:2", "team/app", "2", "sha256:a")
	put("Team/x:1", "Team/x", "1", "sha256:b") // byte order: upper case first
	put("team/app:2", "team/app", "2", "sha256:c")
	im, err := store.GetImage(ctx, db.SQL, "team/app:2")
	if err != nil || im.Digest != "sha256:c" || im.Repository != "team/app" || im.Tag != "2" || !im.CreatedAt.Equal(t0) {
		t.Fatalf("get: %+v, %v", im, err)
	}
	names := func(l []store.Image) []string {
		out := []string{}
		for _, i := range l {
			out = append(out, i.Name)
		}
		return out
	}
	if l, _ := store.ListImages(ctx, db.SQL, ""); !reflect.DeepEqual(names(l), []string{"Team/x:1", "team/app:1", "team/app:2"}) {
		t.Fatalf("list: %v", names(l))
	}
	if l, _ := store.ListImages(ctx, db.SQL, "sha256:a"); !reflect.DeepEqual(names(l), []string{"team/app:1"}) {
		t.Fatalf("list by digest: %v", names(l))
	}
	if l, _ := store.ListImagesInRepo(ctx, db.SQL, "team/app"); !reflect.DeepEqual(names(l), []string{"team/app:1", "team/app:2"}) {
		t.Fatalf("list repo: %v", names(l))
	}
	if err := store.DeleteImage(ctx, db.SQL, "team/app:1"); err != nil {
		t.Fatal(err)
	}
	if err := store.DeleteImage(ctx, db.SQL, "team/app:1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("delete twice: %v", err)
	}
	if _, err := store.GetImage(ctx, db.SQL, "team/app:1"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
}

func testTokens(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	t0 := now()
	tok := func(id string, created, expires time.Time) store.Token {
		return store.Token{ID: id, Subject: "s-" + id, Tenant: "team", CacheScope: "team", Scopes: []string{"build:read", "build:write"},
			CreatedAt: created, ExpiresAt: expires}
	}
	for _, tk := range []store.Token{tok("t1", t0, t0.Add(time.Hour)), tok("t2", t0.Add(time.Second), t0.Add(time.Hour)), tok("t3", t0, t0.Add(-time.Minute))} {
		if err := store.PutToken(ctx, db.SQL, tk); err != nil {
			t.Fatal(err)
		}
	}
	// Recording twice is a no-op.
	if err := store.PutToken(ctx, db.SQL, tok("t1", t0, t0.Add(48*time.Hour))); err != nil {
		t.Fatal(err)
	}
	list, err := store.ListTokens(ctx, db.SQL)
	if err != nil || len(list) != 3 || list[0].ID != "t2" || list[1].ID != "t1" || list[2].ID != "t3" {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if !reflect.DeepEqual(list[1], tok("t1", t0, t0.Add(time.Hour))) {
		t.Fatalf("token reads %+v", list[1])
	}
	r1, err := store.RevokeToken(ctx, db.SQL, "t1", t0.Add(time.Minute))
	if err != nil || !r1.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("revoke: %+v, %v", r1, err)
	}
	if r1, _ := store.RevokeToken(ctx, db.SQL, "t1", t0.Add(2*time.Minute)); !r1.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("revoking twice moved the time to %v", r1.RevokedAt)
	}
	if _, err := store.RevokeToken(ctx, db.SQL, "nope", t0); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("revoke unknown: %v", err)
	}
	store.RevokeToken(ctx, db.SQL, "t3", t0)
	if got, err := store.RevokedTokenIDs(ctx, db.SQL, t0); err != nil || !reflect.DeepEqual(got, []string{"t1"}) {
		t.Fatalf("revoked: %v, %v; want [t1] (t3 expired)", got, err)
	}
}

func testInTxRollback(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	boom := errors.New("boom")
	err := db.InTx(ctx, func(tx *sql.Tx) error {
		mustCreate(t, tx, store.Build{ID: "a"})
		if _, err := store.AppendEvent(ctx, tx, "a", "status", []byte(`{}`)); err != nil {
			return err
		}
		if err := store.PutImage(ctx, tx, store.Image{Name: "r:t", Repository: "r", Tag: "t", Digest: "d", CreatedAt: now()}); err != nil {
			return err
		}
		if _, err := store.GetBuild(ctx, tx, "a"); err != nil {
			return fmt.Errorf("the transaction does not see its own write: %w", err)
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("InTx returned %v, want fn's error", err)
	}
	if _, err := store.GetBuild(ctx, db.SQL, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a rolled back build exists: %v", err)
	}
	if _, err := store.GetImage(ctx, db.SQL, "r:t"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("a rolled back image exists: %v", err)
	}
	if err := db.InTx(ctx, func(tx *sql.Tx) error { mustCreate(t, tx, store.Build{ID: "a"}); return nil }); err != nil {
		t.Fatal(err)
	}
	if b, err := store.GetBuild(ctx, db.SQL, "a"); err != nil || b.Seq != 1 {
		t.Fatalf("committed build: %+v, %v", b, err)
	}
}

type jobArgs struct {
	BuildID string `json:"build_id"`
}

func (jobArgs) Kind() string { return "conformance" }

// A build record and its River job commit, or roll back, together: River
// runs on the store's own *sql.DB through DB.RiverDriver.
func testQueueJobInBuildTransaction(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	m, err := rivermigrate.New(db.RiverDriver(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatalf("River migrations: %v", err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatalf("River migrations again: %v", err)
	}
	rc, err := river.NewClient(db.RiverDriver(), &river.Config{}) // insert-only
	if err != nil {
		t.Fatal(err)
	}
	jobs := func() int {
		var n int
		if err := db.SQL.QueryRowContext(ctx, `SELECT COUNT(*) FROM river_job`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	err = db.InTx(ctx, func(tx *sql.Tx) error {
		mustCreate(t, tx, store.Build{ID: "a"})
		if _, err := rc.InsertTx(ctx, tx, jobArgs{BuildID: "a"}, nil); err != nil {
			t.Fatal(err)
		}
		return errors.New("roll back")
	})
	if err == nil || jobs() != 0 {
		t.Fatalf("after a rollback: %v, %d jobs", err, jobs())
	}
	err = db.InTx(ctx, func(tx *sql.Tx) error {
		mustCreate(t, tx, store.Build{ID: "a"})
		_, err := rc.InsertTx(ctx, tx, jobArgs{BuildID: "a"}, nil)
		return err
	})
	if err != nil || jobs() != 1 {
		t.Fatalf("after a commit: %v, %d jobs", err, jobs())
	}
}

// Of identical submissions arriving together, exactly one leads: the
// in-flight lookup and the insert run in one InTx, and InTx transactions
// see each other as if run one at a time.
func testExactlyOneLeader(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	const n = 12
	var wg sync.WaitGroup
	var mu sync.Mutex
	var leaders, followers []string
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			id := fmt.Sprintf("s%02d", i)
			err := db.InTx(ctx, func(tx *sql.Tx) error {
				_, err := store.FindInFlight(ctx, tx, "same", []string{"team"}, id)
				lead := errors.Is(err, store.ErrNotFound)
				if err != nil && !lead {
					return err
				}
				time.Sleep(5 * time.Millisecond) // widen the window a race would need
				b := store.Build{ID: id, InputHash: "same", Tenant: "team", Subject: "s", Status: store.StatusQueued, Attempt: 1, CreatedAt: now()}
				if err := store.CreateBuild(ctx, tx, &b); err != nil {
					return err
				}
				mu.Lock()
				defer mu.Unlock()
				if lead {
					leaders = append(leaders, id)
				} else {
					followers = append(followers, id)
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	close(start)
	wg.Wait()
	if len(leaders) != 1 || len(followers) != n-1 {
		t.Fatalf("%d leaders %v and %d followers; want exactly one leader", len(leaders), leaders, len(followers))
	}
}

// Numbers drawn by concurrent writers outside any transaction stay
// unique: builds.seq and each build's event seq.
func testConcurrentNumbering(t *testing.T, newDB func(t *testing.T) (*store.DB, string)) {
	db, _ := newDB(t)
	const writers, each = 8, 15
	var wg sync.WaitGroup
	var mu sync.Mutex
	var seqs, evs []int64
	mustCreate(t, db.SQL, store.Build{ID: "e"})
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				b := store.Build{ID: fmt.Sprintf("w%d-%d", w, i), Subject: "s", Tenant: "t", Status: store.StatusQueued, Attempt: 1, CreatedAt: now()}
				if err := store.CreateBuild(ctx, db.SQL, &b); err != nil {
					t.Error(err)
					return
				}
				seq, err := store.AppendEvent(ctx, db.SQL, "e", "log", []byte(`{}`))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				seqs, evs = append(seqs, b.Seq), append(evs, seq)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for name, got := range map[string][]int64{"build seq": seqs, "event seq": evs} {
		sort.Slice(got, func(i, j int) bool { return got[i] < got[j] })
		for i, s := range got {
			if s != int64(i+1)+map[string]int64{"build seq": 1, "event seq": 0}[name] {
				t.Fatalf("%s: %v are not unique and dense", name, got)
			}
		}
	}
	got, _ := store.Events(ctx, db.SQL, "e", 0, 1000)
	if len(got) != writers*each {
		t.Fatalf("%d events stored, want %d", len(got), writers*each)
	}
}
