package store

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// Queue positions are unique at any moment and say when a build will
// start: builds holding their volume and waiting for a slot first, then
// builds still waiting for their cache scope; a build no longer queued
// has none, whatever copy of it the caller holds.
func TestQueuePositionsAreUniqueAndLive(t *testing.T) {
	ctx := context.Background()
	db, err := Open(ctx, filepath.Join(t.TempDir(), "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	now := time.Now()
	add := func(id, scope, status string) {
		b := Build{ID: id, Status: status, Subject: "s", Tenant: "t", CacheScope: scope, Attempt: 1, CreatedAt: now}
		if err := CreateBuild(ctx, db.SQL, &b); err != nil {
			t.Fatal(err)
		}
	}
	add("r", "s", StatusRunning)
	add("s2", "s", StatusQueued) // waits for scope s
	add("s3", "s", StatusQueued)
	for _, id := range []string{"t4", "t5", "t6"} {
		add(id, id, StatusQueued)
		if err := EnterSlotLine(ctx, db.SQL, id, 1); err != nil {
			t.Fatal(err)
		}
	}
	check := func(want map[string]int) {
		t.Helper()
		seen := map[int]string{}
		for id, w := range want {
			got, err := QueuePosition(ctx, db.SQL, id)
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
	if ok, err := StartBuild(ctx, db.SQL, "t4", 1, "process", now); err != nil || !ok {
		t.Fatal(ok, err)
	}
	check(map[string]int{"t4": 0, "t5": 1, "t6": 2, "s2": 3, "s3": 4})
	// Getting in line twice keeps the first place; a requeued build
	// starts over behind the slot line.
	if err := EnterSlotLine(ctx, db.SQL, "t5", 1); err != nil {
		t.Fatal(err)
	}
	if _, err := Requeue(ctx, db.SQL, "t6"); err != nil {
		t.Fatal(err)
	}
	check(map[string]int{"t5": 1, "s2": 2, "s3": 3, "t6": 4})
}
