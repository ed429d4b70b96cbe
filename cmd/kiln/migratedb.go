package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/internal/store"
)

func migrateDBCommand() *cobra.Command {
	var from, to string
	cmd := &cobra.Command{
		Use:   "migrate-db --from DATA_DIR|SQLITE_FILE --to postgres://...",
		Short: "Copy a kiln server's records from its SQLite database to an empty PostgreSQL database",
		Long: `migrate-db copies every kiln record (builds, build events, images, tokens)
from a SQLite database — a data directory's kiln.db, or the file itself —
into an empty PostgreSQL database, in one transaction, and checks that every
table's row count matches before committing. Stop kiln serve first.

The queue is not copied: start kiln serve with database set to the
PostgreSQL URL (and the same data directory: keys, registry, cache volumes
stay there) and it requeues every build that was queued or running, as
after any restart. The SQLite file keeps its records (it is only brought to
this kiln's schema, as kiln serve would do).

The target URL may hold a password: pass it in KILN_DATABASE (or use
PGPASSWORD or ~/.pgpass) rather than --to, which shows in ps.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				to = os.Getenv("KILN_DATABASE")
			}
			if !store.IsPostgres(to) {
				return fmt.Errorf("--to (or KILN_DATABASE) must be a postgres:// URL")
			}
			if from == "" {
				return fmt.Errorf("--from is required: the data directory (or its kiln.db) to copy from")
			}
			path := from
			if fi, err := os.Stat(from); err != nil {
				return fmt.Errorf("--from: %w", err)
			} else if fi.IsDir() {
				path = store.Location("", from)
				if _, err := os.Stat(path); err != nil {
					return fmt.Errorf("--from %s: no kiln.db in it: %w", from, err)
				}
			}
			ctx := cmd.Context()
			src, err := store.Open(ctx, path)
			if err != nil {
				return fmt.Errorf("open the source: %w", err)
			}
			defer src.Close()
			dst, err := store.Open(ctx, to)
			if err != nil {
				return fmt.Errorf("open the target: %w", err)
			}
			defer dst.Close()
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "copying %s to %s\n", src, dst)
			counts, err := store.CopyRecords(ctx, src, dst)
			if err != nil {
				return err
			}
			for _, c := range counts {
				fmt.Fprintf(out, "  %-14s %d rows\n", c.Table, c.Rows)
			}
			fmt.Fprintf(out, "done: every table's row count matches. Start kiln serve with database set to the PostgreSQL URL and the same data directory; builds that were queued or running are requeued on start.\n")
			return nil
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "the data directory (or SQLite file) to copy from")
	cmd.Flags().StringVar(&to, "to", "", "the empty PostgreSQL database to copy to, postgres://user@host:5432/dbname (default: $KILN_DATABASE)")
	return cmd
}
