// Package store persists kiln's records in SQLite (modernc.org/sqlite, pure
// Go, the default) or PostgreSQL (pgx through database/sql). The same
// *sql.DB carries River's queue tables, so a build record and its queue
// job commit in one transaction on either.
//
// Both dialects run the same SQL: queries are written with ? placeholders
// and rebound to $1, $2, … (which SQLite reads as ?1, ?2, …) by rebind; the
// schema is one list of migrations, with a per-dialect file only where
// the SQL must differ (see migrate). Guarantees SQLite gets from its single
// writer are made explicit for Postgres where they matter: InTx takes one
// transaction lock, and inserts that number rows (builds.seq,
// build_events.seq) retry when a concurrent insert took their number.
package store

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/riverdriver/riverdatabasesql"
	"github.com/riverqueue/river/riverdriver/riversqlite"
	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/kiln-build/kiln/internal/errdefs"
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = fmt.Errorf("record %w", errdefs.ErrNotFound)

// Querier is what both *sql.DB and *sql.Tx offer, so every method can run
// inside a caller's transaction.
type Querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// Dialect is the database engine behind a DB.
type Dialect string

const (
	SQLite   Dialect = "sqlite"
	Postgres Dialect = "postgres"
)

// DB is kiln's database.
type DB struct {
	SQL     *sql.DB
	dialect Dialect
	// where names the database for logs and errors: the SQLite path, or
	// postgres://host:port/dbname — never a password.
	where string
}

//go:embed migrations/*.sql migrations/postgres/*.sql
var migrations embed.FS

// IsPostgres reports whether the database setting names a PostgreSQL
// database (a postgres:// or postgresql:// URL) rather than a SQLite file.
func IsPostgres(database string) bool {
	return strings.HasPrefix(database, "postgres://") || strings.HasPrefix(database, "postgresql://")
}

// Location resolves the database setting: a postgres:// URL as is; empty,
// <dataDir>/kiln.db; any other value a SQLite file, relative to dataDir
// unless absolute.
func Location(database, dataDir string) string {
	switch {
	case IsPostgres(database):
		return database
	case database == "":
		return filepath.Join(dataDir, "kiln.db")
	case filepath.IsAbs(database):
		return database
	default:
		return filepath.Join(dataDir, database)
	}
}

// Open opens the database named by location — a SQLite file path
// (created if needed) or a postgres:// URL — and applies pending
// migrations.
func Open(ctx context.Context, location string) (*DB, error) {
	var s *DB
	var err error
	if IsPostgres(location) {
		s, err = openPostgres(ctx, location)
	} else {
		s, err = openSQLite(ctx, location)
	}
	if err != nil {
		return nil, err
	}
	if err := s.migrate(ctx); err != nil {
		s.SQL.Close()
		return nil, err
	}
	return s, nil
}

func openSQLite(ctx context.Context, path string) (*DB, error) {
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	// SQLite allows one writer; River's SQLite driver asks for a single
	// connection to avoid SQLITE_BUSY under its parallel maintenance work.
	// Every query here is short and never holds rows open across calls.
	db.SetMaxOpenConns(1)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	return &DB{SQL: db, dialect: SQLite, where: path}, nil
}

func openPostgres(ctx context.Context, url string) (*DB, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		// pgx's parse errors redact passwords only on a best-effort
		// basis: say what is wrong without quoting the value.
		return nil, fmt.Errorf("database: not a valid PostgreSQL URL (postgres://user@host:port/dbname?sslmode=...); the value is not shown, it may hold a password")
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "kiln"
	}
	// What may be shown: no user, password or parameters.
	where := fmt.Sprintf("postgres://%s:%d/%s", cfg.Host, cfg.Port, cfg.Database)
	db := stdlib.OpenDB(*cfg)
	// River's workers, the API and event writers share the pool; kiln's
	// statements are short, so a modest pool serves many builds.
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(8)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s: %w", where, err)
	}
	return &DB{SQL: db, dialect: Postgres, where: where}, nil
}

// Dialect is the engine behind s.
func (s *DB) Dialect() Dialect { return s.dialect }

// String names the database without secrets, for logs: the SQLite file,
// or postgres://host:port/dbname.
func (s *DB) String() string { return s.where }

// Close closes the database.
func (s *DB) Close() error { return s.SQL.Close() }

// RiverDriver is River's driver for this database, on the same *sql.DB,
// so River jobs are inserted in kiln's transactions (River.InsertTx).
func (s *DB) RiverDriver() riverdriver.Driver[*sql.Tx] {
	if s.dialect == Postgres {
		return riverdatabasesql.New(s.SQL)
	}
	return riversqlite.New(s.SQL)
}

// txLockKey is the Postgres advisory lock every InTx transaction holds;
// migrateLockKey the session lock migrate holds.
const (
	txLockKey      = 0x6b696c6e_74780001
	migrateLockKey = 0x6b696c6e_74780002
)

// InTx runs fn in a transaction, committing if it returns nil.
//
// On SQLite every transaction begins IMMEDIATE: it takes the database's
// one write lock first, so InTx transactions run one at a time and each
// sees everything committed before it. Kiln relies on that where a read
// decides a write — of identical submissions arriving together exactly
// one leads, because the in-flight lookup and the insert of the build run
// in one InTx. On Postgres (READ COMMITTED) InTx gives the same guarantee
// by taking one transaction-scoped advisory lock as its first statement:
// later statements take their snapshots after it, so they see every
// InTx transaction committed before. SERIALIZABLE would give it too, but
// a losing transaction fails at commit and must be rerun, and InTx's
// callers do more than SQL in fn (they set fields, insert River jobs), so
// a rerun is not safe to do blindly; kiln's transactions are few and
// short, so the lock costs little. Statements outside InTx do not take
// it and must not rely on it.
func (s *DB) InTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.SQL.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", err)
	}
	if s.dialect == Postgres {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(txLockKey)); err != nil {
			tx.Rollback()
			return fmt.Errorf("begin transaction: lock: %w", err)
		}
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// SchemaVersion is the number of the newest kiln migration applied.
func (s *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.SQL.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM kiln_migrations`).Scan(&v)
	return v, err
}

// migrate applies pending migrations in version order, each in its own
// transaction. migrations/NNN_name.sql is the schema of both dialects;
// migrations/postgres/NNN_name.sql, when present, replaces it on
// Postgres, for SQL that must differ (BIGINT for 64-bit integers, byte
// order collation for keys compared as ranges, functions SQLite and
// Postgres name differently). Versions are shared, so one version number
// means one schema on either.
func (s *DB) migrate(ctx context.Context) error {
	if s.dialect == Postgres {
		// Nodes starting together migrate one at a time: a session lock,
		// held on one connection of the pool until migrate returns.
		conn, err := s.SQL.Conn(ctx)
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, int64(migrateLockKey)); err != nil {
			return fmt.Errorf("lock for migrations: %w", err)
		}
		defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(migrateLockKey))
	}
	if _, err := s.SQL.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS kiln_migrations (version INTEGER PRIMARY KEY)`); err != nil {
		return fmt.Errorf("create migrations table: %w", err)
	}
	current, err := s.SchemaVersion(ctx)
	if err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	list, err := migrationList(s.dialect)
	if err != nil {
		return err
	}
	for _, m := range list {
		if m.version <= current {
			continue
		}
		body, err := migrations.ReadFile(m.path)
		if err != nil {
			return err
		}
		err = s.InTx(ctx, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, string(body)); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, rebind(`INSERT INTO kiln_migrations (version) VALUES (?)`), m.version)
			return err
		})
		if err != nil {
			return fmt.Errorf("apply migration %s (%s): %w", m.name, s.dialect, err)
		}
	}
	return nil
}

type migration struct {
	version    int
	name, path string
}

// migrationList is every migration of dialect d, in version order.
func migrationList(d Dialect) ([]migration, error) {
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []migration
	seen := map[int]string{}
	for _, name := range names {
		base := strings.TrimPrefix(name, "migrations/")
		version, err := strconv.Atoi(strings.SplitN(base, "_", 2)[0])
		if err != nil {
			return nil, fmt.Errorf("migration %s: name must start with a number", name)
		}
		if other, dup := seen[version]; dup {
			return nil, fmt.Errorf("migrations %s and %s share version %d", other, base, version)
		}
		seen[version] = base
		path := name
		if d == Postgres {
			if _, err := fs.Stat(migrations, "migrations/postgres/"+base); err == nil {
				path = "migrations/postgres/" + base
			}
		}
		out = append(out, migration{version: version, name: base, path: path})
	}
	return out, nil
}

// rebind turns the ? placeholders of query into $1, $2, …, which both
// Postgres and SQLite (as ?NNN) read. A ? inside a quoted string or
// identifier is left alone.
func rebind(query string) string {
	if !strings.Contains(query, "?") {
		return query
	}
	var b strings.Builder
	b.Grow(len(query) + 8)
	n := 0
	var quote byte
	for i := 0; i < len(query); i++ {
		c := query[i]
		switch {
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '\'' || c == '"':
			quote = c
		case c == '?':
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// bound is a Querier whose queries are rebound, so store functions write
// ? and run on either dialect.
type bound struct{ q Querier }

func bind(q Querier) Querier {
	if b, ok := q.(bound); ok {
		return b
	}
	return bound{q}
}

func (b bound) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	return b.q.ExecContext(ctx, rebind(query), args...)
}

func (b bound) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	return b.q.QueryContext(ctx, rebind(query), args...)
}

func (b bound) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	return b.q.QueryRowContext(ctx, rebind(query), args...)
}
