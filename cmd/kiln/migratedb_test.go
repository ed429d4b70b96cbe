package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

func TestMigrateDB(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	src, err := store.Open(ctx, filepath.Join(data, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	b := store.Build{ID: "b1", Status: store.StatusQueued, Subject: "s", Tenant: "t", Attempt: 1, CreatedAt: time.Now()}
	if err := store.CreateBuild(ctx, src.SQL, &b); err != nil {
		t.Fatal(err)
	}
	store.AppendEvent(ctx, src.SQL, "b1", "status", []byte(`{}`))
	src.Close()

	// The server trusts loopback, so any password works; it must never
	// be shown.
	target := strings.Replace(testkit.Postgres(t), "kiln@", "kiln:s3cret@", 1)
	run := func(args ...string) (string, error) {
		cmd := migrateDBCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(args)
		err := cmd.ExecuteContext(ctx)
		if err != nil {
			out.WriteString(err.Error())
		}
		if strings.Contains(out.String(), "s3cret") {
			t.Fatalf("the password shows:\n%s", out.String())
		}
		return out.String(), err
	}
	out, err := run("--from", data, "--to", target)
	if err != nil {
		t.Fatalf("migrate-db: %v\n%s", err, out)
	}
	for _, want := range []string{"builds", "1 rows", "build_events", "every table's row count matches"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	dst, err := store.Open(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if got, err := store.GetBuild(ctx, dst.SQL, "b1"); err != nil || got.Status != store.StatusQueued {
		t.Fatalf("copied build: %+v, %v", got, err)
	}

	// Again: the target is no longer empty.
	t.Setenv("KILN_DATABASE", target)
	if out, err := run("--from", filepath.Join(data, "kiln.db")); err == nil || !strings.Contains(out, "not empty") {
		t.Fatalf("a second copy: %v\n%s", err, out)
	}
	if out, err := run("--from", filepath.Join(data, "nope")); err == nil {
		t.Fatalf("a missing source: %s", out)
	}
	if out, err := run("--from", data, "--to", "mysql://u:s3cret@h/db"); err == nil || !strings.Contains(out, "postgres://") {
		t.Fatalf("a non-postgres target: %v\n%s", err, out)
	}
}
