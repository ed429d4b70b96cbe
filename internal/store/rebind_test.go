package store

import "testing"

func TestRebind(t *testing.T) {
	for in, want := range map[string]string{
		`SELECT 1`:                       `SELECT 1`,
		`a = ? AND b IN (?, ?)`:          `a = $1 AND b IN ($2, $3)`,
		`x = '?' AND y = ? AND "q?" = ?`: `x = '?' AND y = $1 AND "q?" = $2`,
		`VALUES (?, 'it''s ?', ?)`:       `VALUES ($1, 'it''s ?', $2)`,
		`LIMIT ?`:                        `LIMIT $1`,
	} {
		if got := rebind(in); got != want {
			t.Errorf("rebind(%q) = %q, want %q", in, got, want)
		}
	}
}
