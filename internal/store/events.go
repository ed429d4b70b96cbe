package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// Event is one persisted build event. Data is the event's JSON; Seq is
// per build, strictly increasing from 1 and never reused, which is what
// makes SSE resume (Last-Event-ID) exact.
type Event struct {
	Seq  int64
	Kind string
	Data []byte
}

// AppendEvent stores an event and returns its sequence number: the next
// after the build's highest. Events of one build may be appended
// concurrently (a cancel while the build reports): on Postgres the loser
// of a race for a number gets no row (ON CONFLICT waits for the winner's
// transaction) and takes the next one; SQLite's single writer never races.
func AppendEvent(ctx context.Context, q Querier, buildID, kind string, data []byte) (int64, error) {
	q = bind(q)
	for try := 0; ; try++ {
		var seq int64
		err := q.QueryRowContext(ctx, `INSERT INTO build_events (build_id, seq, kind, data)
		VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM build_events WHERE build_id = ?), ?, ?)
		ON CONFLICT (build_id, seq) DO NOTHING
		RETURNING seq`, buildID, buildID, kind, string(data)).Scan(&seq)
		if errors.Is(err, sql.ErrNoRows) && try < maxNumberingTries {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("append event to build %s: %w", buildID, err)
		}
		return seq, nil
	}
}

// Events returns up to limit events of a build with seq > after.
func Events(ctx context.Context, q Querier, buildID string, after int64, limit int) ([]Event, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, `SELECT seq, kind, data FROM build_events
		WHERE build_id = ? AND seq > ? ORDER BY seq LIMIT ?`, buildID, after, limit)
	if err != nil {
		return nil, fmt.Errorf("read events of build %s: %w", buildID, err)
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var data string
		if err := rows.Scan(&e.Seq, &e.Kind, &data); err != nil {
			return nil, err
		}
		e.Data = []byte(data)
		out = append(out, e)
	}
	return out, rows.Err()
}
