package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Token is what kiln remembers of a token it issued: never the token.
type Token struct {
	ID         string
	Subject    string
	Tenant     string
	CacheScope string
	Scopes     []string
	CreatedAt  time.Time
	ExpiresAt  time.Time
	RevokedAt  time.Time // zero unless revoked
}

// PutToken records an issued token; recording it twice is a no-op.
func PutToken(ctx context.Context, q Querier, t Token) error {
	q = bind(q)
	_, err := q.ExecContext(ctx, `INSERT INTO tokens (id, subject, tenant, cache_scope, scopes, created_at, expires_at)
		VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
		t.ID, t.Subject, t.Tenant, t.CacheScope, strings.Join(t.Scopes, ","), t.CreatedAt.UnixMicro(), t.ExpiresAt.UnixMicro())
	if err != nil {
		return fmt.Errorf("record token %s: %w", t.ID, err)
	}
	return nil
}

// ListTokens returns the recorded tokens, newest first, expired ones
// included (they show why an old token stopped working).
func ListTokens(ctx context.Context, q Querier) ([]Token, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, `SELECT `+tokenColumns+` FROM tokens ORDER BY created_at DESC, id`)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	defer rows.Close()
	var out []Token
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

const tokenColumns = `id, subject, tenant, cache_scope, scopes, created_at, expires_at, revoked_at`

func scanToken(row interface{ Scan(...any) error }) (Token, error) {
	var t Token
	var scopes string
	var created, expires int64
	var revoked sql.NullInt64
	if err := row.Scan(&t.ID, &t.Subject, &t.Tenant, &t.CacheScope, &scopes, &created, &expires, &revoked); err != nil {
		return Token{}, err
	}
	t.Scopes = strings.Split(scopes, ",")
	t.CreatedAt, t.ExpiresAt = time.UnixMicro(created).UTC(), time.UnixMicro(expires).UTC()
	if revoked.Valid {
		t.RevokedAt = time.UnixMicro(revoked.Int64).UTC()
	}
	return t, nil
}

// RevokeToken marks a token revoked and returns it; revoking twice keeps
// the first time. An unknown id is ErrNotFound.
func RevokeToken(ctx context.Context, q Querier, id string, at time.Time) (Token, error) {
	q = bind(q)
	if _, err := q.ExecContext(ctx, `UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?`, at.UnixMicro(), id); err != nil {
		return Token{}, fmt.Errorf("revoke token %s: %w", id, err)
	}
	t, err := scanToken(q.QueryRowContext(ctx, `SELECT `+tokenColumns+` FROM tokens WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Token{}, ErrNotFound
	}
	if err != nil {
		return Token{}, fmt.Errorf("read token %s: %w", id, err)
	}
	return t, nil
}

// RevokedTokenIDs lists every revoked token id that has not expired yet;
// an expired token fails verification anyway.
func RevokedTokenIDs(ctx context.Context, q Querier, now time.Time) ([]string, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, `SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?`, now.UnixMicro())
	if err != nil {
		return nil, fmt.Errorf("list revoked tokens: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		out = append(out, id)
	}
	return out, rows.Err()
}
