package store

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
)

// TableCount is how many rows of one table a copy moved.
type TableCount struct {
	Table string
	Rows  int64
}

// CopyRecords copies every kiln record — every table of kiln's schema:
// builds, their events, images, tokens and whatever later migrations add
// — from src, a SQLite database, into dst, a PostgreSQL database that
// holds none yet. Both must be at the same schema version (Open migrates
// both). It reads src in one transaction, writes dst in one transaction,
// and commits only when every table's row count in dst matches src's; on
// any error dst is left as it was.
//
// River's queue is not copied: jobs belong to a server process, and on
// its next start kiln requeues every build left queued or running (a new
// attempt with a new job), as after any restart.
//
// The server must be stopped while it runs: rows written to src after
// the copy read it are not copied.
func CopyRecords(ctx context.Context, src, dst *DB) ([]TableCount, error) {
	if src.dialect != SQLite || dst.dialect != Postgres {
		return nil, fmt.Errorf("copy records: from SQLite to PostgreSQL only (got %s to %s)", src.dialect, dst.dialect)
	}
	sv, err := src.SchemaVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the source's schema version: %w", err)
	}
	dv, err := dst.SchemaVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the target's schema version: %w", err)
	}
	if sv != dv {
		return nil, fmt.Errorf("the source is at schema version %d and the target at %d: open both with this kiln (it migrates them) and run again", sv, dv)
	}

	// One read transaction: a consistent snapshot of the source (it also
	// takes SQLite's write lock, so a server still running waits).
	stx, err := src.SQL.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("read the source: %w", err)
	}
	defer stx.Rollback()
	tables, err := sqliteTables(ctx, stx)
	if err != nil {
		return nil, err
	}
	if err := dstEmpty(ctx, dst, tables); err != nil {
		return nil, err
	}
	var out []TableCount
	err = dst.InTx(ctx, func(dtx *sql.Tx) error {
		for _, t := range tables {
			n, err := copyTable(ctx, stx, dtx, t)
			if err != nil {
				return fmt.Errorf("copy table %s: %w", t, err)
			}
			var want, got int64
			if err := stx.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+t).Scan(&want); err != nil {
				return fmt.Errorf("count %s in the source: %w", t, err)
			}
			if err := dtx.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+t).Scan(&got); err != nil {
				return fmt.Errorf("count %s in the target: %w", t, err)
			}
			if want != got || got != n {
				return fmt.Errorf("table %s: the source has %d rows, %d were copied and the target has %d; nothing was committed", t, want, n, got)
			}
			out = append(out, TableCount{Table: t, Rows: got})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// sqliteTables lists kiln's tables, tables referenced by foreign keys
// before those referencing them. River's tables, SQLite's own and the
// migration ledger are not records.
func sqliteTables(ctx context.Context, q Querier) ([]string, error) {
	rows, err := q.QueryContext(ctx, `SELECT name FROM sqlite_master WHERE type = 'table'
		AND name NOT LIKE 'sqlite%' AND name NOT LIKE 'river%' AND name != 'kiln_migrations' ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list the source's tables: %w", err)
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return nil, err
		}
		names = append(names, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	refs := map[string][]string{}
	for _, n := range names {
		r, err := q.QueryContext(ctx, `SELECT DISTINCT "table" FROM pragma_foreign_key_list(?)`, n)
		if err != nil {
			return nil, fmt.Errorf("foreign keys of %s: %w", n, err)
		}
		for r.Next() {
			var to string
			if err := r.Scan(&to); err != nil {
				r.Close()
				return nil, err
			}
			if to != n {
				refs[n] = append(refs[n], to)
			}
		}
		r.Close()
	}
	var out []string
	done := map[string]bool{}
	var visit func(n string, depth int)
	visit = func(n string, depth int) {
		if done[n] || depth > len(names) {
			return
		}
		for _, to := range refs[n] {
			visit(to, depth+1)
		}
		if !done[n] {
			done[n] = true
			out = append(out, n)
		}
	}
	for _, n := range names {
		visit(n, 0)
	}
	return out, nil
}

// dstEmpty fails unless dst holds no kiln record and no River job.
func dstEmpty(ctx context.Context, dst *DB, tables []string) error {
	for _, t := range append([]string{"river_job"}, tables...) {
		var exists bool
		if err := dst.SQL.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, t).Scan(&exists); err != nil {
			return fmt.Errorf("inspect the target: %w", err)
		}
		if !exists {
			if t == "river_job" {
				continue
			}
			return fmt.Errorf("the target has no table %s: it is not at this kiln's schema", t)
		}
		var any bool
		if err := dst.SQL.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+t+`)`).Scan(&any); err != nil {
			return fmt.Errorf("inspect the target's %s: %w", t, err)
		}
		if any {
			return fmt.Errorf("the target database is not empty (table %s has rows): migrate-db copies only into a database no kiln has used yet; create a new one, or drop this one's tables if it holds nothing you need", t)
		}
	}
	return nil
}

// copyTable copies every row of table t, in batches of multi-row
// INSERTs, and returns how many it copied.
func copyTable(ctx context.Context, src *sql.Tx, dst *sql.Tx, t string) (int64, error) {
	rows, err := src.QueryContext(ctx, `SELECT * FROM `+t)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return 0, err
	}
	// Postgres allows 65535 parameters per statement.
	batch := min(500, 60000/len(cols))
	quoted := make([]string, len(cols))
	for i, c := range cols {
		quoted[i] = `"` + strings.ReplaceAll(c, `"`, `""`) + `"`
	}
	head := `INSERT INTO ` + t + ` (` + strings.Join(quoted, ", ") + `) VALUES `
	var args []any
	var n, pending int64
	flush := func() error {
		if pending == 0 {
			return nil
		}
		var b strings.Builder
		b.WriteString(head)
		for r := 0; r < int(pending); r++ {
			if r > 0 {
				b.WriteString(", ")
			}
			b.WriteByte('(')
			for c := range cols {
				if c > 0 {
					b.WriteString(", ")
				}
				fmt.Fprintf(&b, "$%d", r*len(cols)+c+1)
			}
			b.WriteByte(')')
		}
		if _, err := dst.ExecContext(ctx, b.String(), args...); err != nil {
			return err
		}
		n += pending
		args, pending = args[:0], 0
		return nil
	}
	vals := make([]any, len(cols))
	ptrs := make([]any, len(cols))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	for rows.Next() {
		if err := rows.Scan(ptrs...); err != nil {
			return n, err
		}
		args = append(args, vals...)
		pending++
		if pending == int64(batch) {
			if err := flush(); err != nil {
				return n, err
			}
		}
	}
	if err := rows.Err(); err != nil {
		return n, err
	}
	return n, flush()
}
