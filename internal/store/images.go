package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Image is a name (repository:tag) referring to a manifest digest.
type Image struct {
	Name       string
	Repository string
	Tag        string
	Digest     string
	BuildID    string
	CreatedAt  time.Time
}

// PutImage points a name at a digest, replacing what it pointed at.
func PutImage(ctx context.Context, q Querier, im Image) error {
	q = bind(q)
	_, err := q.ExecContext(ctx, `INSERT INTO images (name, repository, tag, digest, build_id, created_at)
		VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, build_id = excluded.build_id, created_at = excluded.created_at`,
		im.Name, im.Repository, im.Tag, im.Digest, im.BuildID, im.CreatedAt.UnixMicro())
	if err != nil {
		return fmt.Errorf("record image %s: %w", im.Name, err)
	}
	return nil
}

const imageColumns = `name, repository, tag, digest, build_id, created_at`

func scanImage(row interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var created int64
	if err := row.Scan(&im.Name, &im.Repository, &im.Tag, &im.Digest, &im.BuildID, &created); err != nil {
		return Image{}, err
	}
	im.CreatedAt = time.UnixMicro(created).UTC()
	return im, nil
}

// GetImage loads one name.
func GetImage(ctx context.Context, q Querier, name string) (Image, error) {
	q = bind(q)
	im, err := scanImage(q.QueryRowContext(ctx, `SELECT `+imageColumns+` FROM images WHERE name = ?`, name))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, ErrNotFound
	}
	if err != nil {
		return Image{}, fmt.Errorf("load image %s: %w", name, err)
	}
	return im, nil
}

// ListImages returns all names, or those of one digest when digest != "".
func ListImages(ctx context.Context, q Querier, digest string) ([]Image, error) {
	q = bind(q)
	query := `SELECT ` + imageColumns + ` FROM images`
	var args []any
	if digest != "" {
		query += ` WHERE digest = ?`
		args = append(args, digest)
	}
	return queryImages(ctx, q, query+` ORDER BY name`, args...)
}

func queryImages(ctx context.Context, q Querier, query string, args ...any) ([]Image, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, im)
	}
	return out, rows.Err()
}

// DeleteImage removes a name.
func DeleteImage(ctx context.Context, q Querier, name string) error {
	q = bind(q)
	res, err := q.ExecContext(ctx, `DELETE FROM images WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("delete image %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return ErrNotFound
	}
	return nil
}

// ListImagesInRepo returns the names of one repository.
func ListImagesInRepo(ctx context.Context, q Querier, repo string) ([]Image, error) {
	q = bind(q)
	return queryImages(ctx, q, `SELECT `+imageColumns+` FROM images WHERE repository = ? ORDER BY name`, repo)
}
