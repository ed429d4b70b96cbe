package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Build statuses.
const (
	StatusQueued    = "queued"
	StatusRunning   = "running"
	StatusSucceeded = "succeeded"
	StatusFailed    = "failed"
	StatusCanceled  = "canceled"
)

// Terminal reports whether status is final.
func Terminal(status string) bool {
	return status == StatusSucceeded || status == StatusFailed || status == StatusCanceled
}

// Build is one build record.
type Build struct {
	ID           string
	Seq          int64
	Status       string
	Phase        string
	Subject      string
	Tenant       string
	CacheScope   string
	Tags         []string
	Options      BuildOptions
	ImageDigest  string
	StepsTotal   int
	StepsCached  int
	DedupOf      string
	InputHash    string
	Error        string
	Runtime      string
	ContextBytes int64
	Attempt      int
	// BuilderReused: the build ran on a builder kept up from an earlier
	// build of its scope.
	BuilderReused bool
	// Timings are seconds per phase (Timing* names).
	Timings map[string]float64
	// Check is what a call=check build's checks found; nil for builds.
	Check      *Check
	CreatedAt  time.Time
	StartedAt  time.Time // zero until running
	FinishedAt time.Time // zero until terminal
}

// Check is the result of a build's Dockerfile checks.
type Check struct {
	Warnings int    `json:"warnings"`
	Report   string `json:"report,omitempty"`
	Error    string `json:"error,omitempty"`
}

// BuildOptions are the request knobs, stored as JSON. Secrets are never
// here: only their ids.
type BuildOptions struct {
	DockerfilePath   string            `json:"dockerfile_path,omitempty"`
	InlineDockerfile bool              `json:"inline_dockerfile,omitempty"`
	BuildArgs        map[string]string `json:"build_args,omitempty"`
	Target           string            `json:"target,omitempty"`
	// Platforms are the normalized platforms asked for (--platform), in
	// order; empty builds the builder's own.
	Platforms         []string `json:"platforms,omitempty"`
	NoCache           bool     `json:"no_cache,omitempty"`
	Pull              bool     `json:"pull,omitempty"`
	SecretIDs         []string `json:"secret_ids,omitempty"`
	CPUs              int      `json:"cpus,omitempty"`
	MemoryMB          int      `json:"memory_mb,omitempty"`
	DiskGB            int      `json:"disk_gb,omitempty"`
	TimeoutSeconds    int      `json:"timeout_seconds,omitempty"`
	GlobalCacheKey    string   `json:"global_cache_key,omitempty"`
	GlobalCacheExport bool     `json:"global_cache_export,omitempty"`
	Admin             bool     `json:"admin,omitempty"` // submitter held build:admin
	Network           string   `json:"network,omitempty"`
	AllowedDomains    []string `json:"allowed_domains,omitempty"`
	// docker build's knobs; AddHosts as "host=ip".
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	AddHosts    []string          `json:"add_hosts,omitempty"`
	ShmSize     int64             `json:"shm_size,omitempty"`
	Ulimits     []string          `json:"ulimits,omitempty"`
	// Call is what the build asks the frontend for: "" (a build) or
	// "check" (the Dockerfile's checks only; no image).
	Call string `json:"call,omitempty"`
	// Entitlements are the insecure entitlements the build asked for and
	// the operator allows (--allow).
	Entitlements []string `json:"entitlements,omitempty"`
	// ContextSource says where the server fetched the context from (a
	// git repository at its commit, a URL), for people.
	ContextSource string `json:"context_source,omitempty"`
	// ContextURL is a git context pinned to its commit
	// (remote#commit[:subdir]); the builder fetches it, and the build has
	// no context directory.
	ContextURL string `json:"context_url,omitempty"`
	// Bases are the build's base images from other registries, pinned
	// at submission and served from kiln's mirror.
	Bases []BasePin `json:"bases,omitempty"`
	// ContextKey keys BuildKit's reuse of earlier context transfers; see
	// solve.Request.ContextKey.
	ContextKey string `json:"context_key,omitempty"`
	// CacheMounts: the Dockerfile may use RUN --mount=type=cache, whose
	// contents the input hash cannot cover.
	CacheMounts bool `json:"cache_mounts,omitempty"`
	// ExternalPush are names on other registries the result is pushed
	// to as well (kiln build --push), as full references.
	ExternalPush []string `json:"external_push,omitempty"`
	// CacheFrom and CacheTo are registry caches the build imports and
	// exports (--cache-from, --cache-to), next to its scope's volume.
	CacheFrom []CacheRef `json:"cache_from,omitempty"`
	CacheTo   *CacheRef  `json:"cache_to,omitempty"`
	// NamedContexts are the build's --build-context entries, by name.
	NamedContexts []NamedContext `json:"named_contexts,omitempty"`
	// RegistryAuthHosts are the registries the submitter sent
	// credentials for; the credentials were held in memory only.
	RegistryAuthHosts []string `json:"registry_auth_hosts,omitempty"`
	// Follows is an identical build that was in flight when this one was
	// submitted: this one waits for it and takes its result.
	Follows string `json:"follows,omitempty"`
	// Provenance is the SLSA provenance attestation asked for: "" (none),
	// min or max (kiln build --provenance, --attest type=provenance).
	Provenance string `json:"provenance,omitempty"`
	// SBOM, when set, asks for an SBOM attestation made by a scanner
	// image pinned at submission (kiln build --sbom).
	SBOM *SBOMAttest `json:"sbom,omitempty"`
	// SSH are the build's ssh-agent ids (--ssh), sorted by id; never a
	// key or a socket.
	SSH []SSHAgent `json:"ssh,omitempty"`
}

// SBOMAttest is an SBOM attestation request: the scanner (generator)
// image, pinned like a base image, and the scanner's extra parameters
// (BUILDKIT_SCAN_<KEY> in its environment).
type SBOMAttest struct {
	Generator BasePin           `json:"generator"`
	Params    map[string]string `json:"params,omitempty"`
}

// NamedContext is one --build-context entry, pinned where it can be.
type NamedContext struct {
	Name string           `json:"name"`
	Kind NamedContextKind `json:"kind"`
	// Source is what BuildKit is given, docker-image://host/repo@digest;
	// for a directory (uploaded, or fetched from git or a URL), its index
	// among the build's named context directories.
	Source string `json:"source"`
	// Hash pins it for the input hash (content hash, digest, commit); ""
	// when it cannot be pinned.
	Hash string `json:"hash,omitempty"`
}

// NamedContextKind is where a named context comes from.
type NamedContextKind string

const (
	NamedLocal NamedContextKind = "local"
	NamedImage NamedContextKind = "image"
)

// CacheRef is a registry cache: a full reference, and the repository in
// kiln's registry when it is kiln's (KilnRepo; the build's registry token
// is granted it).
type CacheRef struct {
	Ref      string `json:"ref"`
	KilnRepo string `json:"kiln_repo,omitempty"`
	// Mode is min or max (export only): max also exports the layers of
	// intermediate stages.
	Mode string `json:"mode,omitempty"`
}

// BasePin is a base image pinned to a digest in kiln's registry: in its
// mirror, or (Local) where a client pushed it.
type BasePin struct {
	Upstream     string `json:"upstream"`   // normalized, e.g. docker.io/library/node:22; for Local the reference as written
	LocalRepo    string `json:"local_repo"` // e.g. mirror/docker.io/library/node
	Digest       string `json:"digest"`
	FromUpstream bool   `json:"from_upstream,omitempty"`
	Local        bool   `json:"local,omitempty"`
}

const buildColumns = `id, seq, status, phase, subject, tenant, cache_scope, tags, options, image_digest,
	steps_total, steps_cached, dedup_of, input_hash, error, runtime, context_bytes, attempt,
	created_at, started_at, finished_at, builder_reused, timings, check_result`

func scanBuild(row interface{ Scan(...any) error }) (Build, error) {
	var b Build
	var tags, opts, timings, check string
	var created int64
	var started, finished sql.NullInt64
	err := row.Scan(&b.ID, &b.Seq, &b.Status, &b.Phase, &b.Subject, &b.Tenant, &b.CacheScope, &tags, &opts,
		&b.ImageDigest, &b.StepsTotal, &b.StepsCached, &b.DedupOf, &b.InputHash, &b.Error, &b.Runtime,
		&b.ContextBytes, &b.Attempt, &created, &started, &finished, &b.BuilderReused, &timings, &check)
	if err != nil {
		return Build{}, err
	}
	if err := json.Unmarshal([]byte(tags), &b.Tags); err != nil {
		return Build{}, fmt.Errorf("build %s: decode tags: %w", b.ID, err)
	}
	if err := json.Unmarshal([]byte(opts), &b.Options); err != nil {
		return Build{}, fmt.Errorf("build %s: decode options: %w", b.ID, err)
	}
	if err := json.Unmarshal([]byte(timings), &b.Timings); err != nil {
		return Build{}, fmt.Errorf("build %s: decode timings: %w", b.ID, err)
	}
	if check != "" {
		if err := json.Unmarshal([]byte(check), &b.Check); err != nil {
			return Build{}, fmt.Errorf("build %s: decode check result: %w", b.ID, err)
		}
	}
	b.CreatedAt = time.UnixMicro(created).UTC()
	if started.Valid {
		b.StartedAt = time.UnixMicro(started.Int64).UTC()
	}
	if finished.Valid {
		b.FinishedAt = time.UnixMicro(finished.Int64).UTC()
	}
	return b, nil
}

func micros(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixMicro()
}

// CreateBuild inserts b, assigning b.Seq.
//
// seq is the next after the highest. SQLite's single writer makes that
// exact; on Postgres a concurrent insert outside InTx may take the same
// number first, and then this insert does nothing (ON CONFLICT waits for
// the other transaction and yields no row) and tries the next number.
func CreateBuild(ctx context.Context, q Querier, b *Build) error {
	q = bind(q)
	tags, _ := json.Marshal(nonNil(b.Tags))
	opts, _ := json.Marshal(b.Options)
	for try := 0; ; try++ {
		err := q.QueryRowContext(ctx, `INSERT INTO builds (id, seq, status, phase, subject, tenant, cache_scope, tags, options,
		image_digest, steps_total, steps_cached, dedup_of, input_hash, error, runtime, context_bytes, attempt,
		created_at, started_at, finished_at)
		VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM builds), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (seq) DO NOTHING
		RETURNING seq`,
			b.ID, b.Status, b.Phase, b.Subject, b.Tenant, b.CacheScope, string(tags), string(opts), b.ImageDigest,
			b.StepsTotal, b.StepsCached, b.DedupOf, b.InputHash, b.Error, b.Runtime, b.ContextBytes, b.Attempt,
			b.CreatedAt.UnixMicro(), micros(b.StartedAt), micros(b.FinishedAt)).Scan(&b.Seq)
		if errors.Is(err, sql.ErrNoRows) && try < maxNumberingTries {
			continue
		}
		if err != nil {
			return fmt.Errorf("insert build %s: %w", b.ID, err)
		}
		return nil
	}
}

// maxNumberingTries bounds the retries of an insert whose number a
// concurrent insert took; each retry sees that insert committed.
const maxNumberingTries = 100

// boolInt is a bool as the 0/1 INTEGER both dialects store it as.
func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// GetBuild loads one build.
func GetBuild(ctx context.Context, q Querier, id string) (Build, error) {
	q = bind(q)
	b, err := scanBuild(q.QueryRowContext(ctx, `SELECT `+buildColumns+` FROM builds WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Build{}, ErrNotFound
	}
	if err != nil {
		return Build{}, fmt.Errorf("load build %s: %w", id, err)
	}
	return b, nil
}

// ListFilter selects builds; results are newest first.
type ListFilter struct {
	// Tenant, when set, limits the list to that tenant's builds.
	Tenant    string
	Status    string
	InputHash string
	// IDPrefix, when set, keeps the builds whose id starts with it (a
	// short id being resolved). Ids are lower-case base32, so the prefix
	// is matched as a range of the primary key.
	IDPrefix  string
	BeforeSeq int64 // paging cursor: only builds with seq < BeforeSeq
	Limit     int
}

// ListBuilds returns builds matching f, newest first.
func ListBuilds(ctx context.Context, q Querier, f ListFilter) ([]Build, error) {
	q = bind(q)
	var where []string
	var args []any
	if f.Tenant != "" {
		where = append(where, "tenant = ?")
		args = append(args, f.Tenant)
	}
	if f.Status != "" {
		where = append(where, "status = ?")
		args = append(args, f.Status)
	}
	if f.InputHash != "" {
		where = append(where, "input_hash = ?")
		args = append(args, f.InputHash)
	}
	if f.IDPrefix != "" {
		// Every id character sorts below '~', so [prefix, prefix~) holds
		// exactly the ids starting with prefix.
		where = append(where, "id >= ? AND id < ?")
		args = append(args, f.IDPrefix, f.IDPrefix+"~")
	}
	if f.BeforeSeq > 0 {
		where = append(where, "seq < ?")
		args = append(args, f.BeforeSeq)
	}
	query := `SELECT ` + buildColumns + ` FROM builds`
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ")
	}
	if f.Limit <= 0 {
		f.Limit = 50
	}
	query += " ORDER BY seq DESC LIMIT ?"
	args = append(args, f.Limit)
	return queryBuilds(ctx, q, query, args...)
}

// Unfinished returns every queued or running build, oldest first.
func Unfinished(ctx context.Context, q Querier) ([]Build, error) {
	q = bind(q)
	return queryBuilds(ctx, q, `SELECT `+buildColumns+` FROM builds WHERE status IN ('queued', 'running') ORDER BY seq`)
}

func queryBuilds(ctx context.Context, q Querier, query string, args ...any) ([]Build, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("list builds: %w", err)
	}
	defer rows.Close()
	var out []Build
	for rows.Next() {
		b, err := scanBuild(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, rows.Err()
}

// QueuePosition is the build's place in line now, or 0 when it is not
// queued (any more): builds waiting for a slot come first, in the order
// they got in line, then builds still waiting for their cache scope, in
// submission order. One statement reads the status and ranks every
// queued build, so no two builds ever get the same place.
func QueuePosition(ctx context.Context, q Querier, id string) (int, error) {
	q = bind(q)
	var pos int
	err := q.QueryRowContext(ctx, `SELECT pos FROM (SELECT id, ROW_NUMBER() OVER
		(ORDER BY line_seq IS NULL, line_seq, seq) AS pos FROM builds WHERE status = 'queued') AS line WHERE id = ?`, id).Scan(&pos)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("queue position of build %s: %w", id, err)
	}
	return pos, nil
}

// EnterSlotLine records that a queued build holds its cache volume and
// now waits for a build slot. On Postgres two builds entering at the same
// moment may draw the same line_seq; QueuePosition breaks the tie by seq,
// so positions stay unique.
func EnterSlotLine(ctx context.Context, q Querier, id string, attempt int) error {
	q = bind(q)
	_, err := q.ExecContext(ctx, `UPDATE builds SET line_seq = (SELECT COALESCE(MAX(line_seq), 0) + 1 FROM builds)
		WHERE id = ? AND status = 'queued' AND attempt = ? AND line_seq IS NULL`, id, attempt)
	if err != nil {
		return fmt.Errorf("put build %s in line for a slot: %w", id, err)
	}
	return nil
}

// CountByStatus returns the number of builds in each status.
func CountByStatus(ctx context.Context, q Querier) (map[string]int, error) {
	q = bind(q)
	rows, err := q.QueryContext(ctx, `SELECT status, COUNT(*) FROM builds GROUP BY status`)
	if err != nil {
		return nil, fmt.Errorf("count builds: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			return nil, err
		}
		out[s] = n
	}
	return out, rows.Err()
}

// StartBuild moves a queued build of the given attempt to running. It
// reports false if the build is no longer queued at that attempt (it was
// canceled, or a newer attempt owns it).
func StartBuild(ctx context.Context, q Querier, id string, attempt int, runtime string, at time.Time) (bool, error) {
	q = bind(q)
	res, err := q.ExecContext(ctx, `UPDATE builds SET status = 'running', runtime = ?, started_at = ?
		WHERE id = ? AND status = 'queued' AND attempt = ?`, runtime, at.UnixMicro(), id, attempt)
	if err != nil {
		return false, fmt.Errorf("start build %s: %w", id, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// Outcome is how a build ended.
type Outcome struct {
	Status      string
	Error       string
	ImageDigest string
	StepsTotal  int
	StepsCached int
	Phase       string
	// BuilderReused, Timings and Check: see Build.
	BuilderReused bool
	Timings       map[string]float64
	Check         *Check
}

// Phase names in Build.Timings.
const (
	TimingQueued       = "queued"
	TimingBuilderStart = "builder_start"
	TimingSolve        = "solve"
)

// FinishBuild moves an unfinished build to a terminal status. It reports
// false, changing nothing, if the build was already terminal — so a cancel
// racing a success has exactly one winner.
func FinishBuild(ctx context.Context, q Querier, id string, o Outcome, at time.Time) (bool, error) {
	q = bind(q)
	timings, err := json.Marshal(o.Timings)
	if err != nil || o.Timings == nil {
		timings = []byte("{}")
	}
	check := ""
	if o.Check != nil {
		b, err := json.Marshal(o.Check)
		if err != nil {
			return false, fmt.Errorf("finish build %s: encode check result: %w", id, err)
		}
		check = string(b)
	}
	res, err := q.ExecContext(ctx, `UPDATE builds SET status = ?, error = ?, image_digest = ?,
		steps_total = ?, steps_cached = ?, phase = ?, finished_at = ?, builder_reused = ?, timings = ?, check_result = ?
		WHERE id = ? AND status IN ('queued', 'running')`,
		o.Status, o.Error, o.ImageDigest, o.StepsTotal, o.StepsCached, o.Phase, at.UnixMicro(),
		boolInt(o.BuilderReused), string(timings), check, id)
	if err != nil {
		return false, fmt.Errorf("finish build %s: %w", id, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// Requeue puts an unfinished build back in the queue under a new attempt
// number, so jobs of older attempts become no-ops.
func Requeue(ctx context.Context, q Querier, id string) (int, error) {
	q = bind(q)
	var attempt int
	err := q.QueryRowContext(ctx, `UPDATE builds SET status = 'queued', phase = 'queued', started_at = NULL,
		attempt = attempt + 1, steps_total = 0, steps_cached = 0, line_seq = NULL
		WHERE id = ? AND status IN ('queued', 'running') RETURNING attempt`, id).Scan(&attempt)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, ErrNotFound
	}
	if err != nil {
		return 0, fmt.Errorf("requeue build %s: %w", id, err)
	}
	return attempt, nil
}

// SetPhase records the build's current phase.
func SetPhase(ctx context.Context, q Querier, id, phase string) error {
	q = bind(q)
	_, err := q.ExecContext(ctx, `UPDATE builds SET phase = ? WHERE id = ? AND status IN ('queued', 'running')`, phase, id)
	if err != nil {
		return fmt.Errorf("set phase of build %s: %w", id, err)
	}
	return nil
}

// SetSteps records live step counts.
func SetSteps(ctx context.Context, q Querier, id string, total, cached int) error {
	q = bind(q)
	_, err := q.ExecContext(ctx, `UPDATE builds SET steps_total = ?, steps_cached = ? WHERE id = ? AND status = 'running'`, total, cached, id)
	if err != nil {
		return fmt.Errorf("set steps of build %s: %w", id, err)
	}
	return nil
}

// FindOriginal returns the newest succeeded, non-deduplicated build of
// one of tenants with input hash h that finished at or after since.
func FindOriginal(ctx context.Context, q Querier, h string, since time.Time, tenants []string) (Build, error) {
	q = bind(q)
	if len(tenants) == 0 {
		return Build{}, ErrNotFound
	}
	in, targs := tenantIn(tenants)
	query := `SELECT ` + buildColumns + ` FROM builds WHERE input_hash = ? AND status = 'succeeded'
		AND dedup_of = '' AND image_digest != '' AND finished_at >= ? AND ` + in
	list, err := queryBuilds(ctx, q, query+` ORDER BY seq DESC LIMIT 1`, append([]any{h, since.UnixMicro()}, targs...)...)
	if err != nil {
		return Build{}, err
	}
	if len(list) == 0 {
		return Build{}, ErrNotFound
	}
	return list[0], nil
}

// tenantIn is the condition "tenant is one of tenants" (not empty) and
// its arguments.
func tenantIn(tenants []string) (string, []any) {
	args := make([]any, len(tenants))
	for i, t := range tenants {
		args[i] = t
	}
	return `tenant IN (?` + strings.Repeat(", ?", len(tenants)-1) + `)`, args
}

// BuildOwner returns the tenant build id belongs to, and whether it is
// still queued or running.
func BuildOwner(ctx context.Context, q Querier, id string) (tenant string, active bool, err error) {
	q = bind(q)
	var status string
	err = q.QueryRowContext(ctx, `SELECT tenant, status FROM builds WHERE id = ?`, id).Scan(&tenant, &status)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, ErrNotFound
	}
	if err != nil {
		return "", false, fmt.Errorf("look up the owner of build %s: %w", id, err)
	}
	return tenant, !Terminal(status), nil
}

// FindInFlight returns the oldest queued or running build of one of
// tenants with input hash h, other than except.
func FindInFlight(ctx context.Context, q Querier, h string, tenants []string, except string) (Build, error) {
	q = bind(q)
	if len(tenants) == 0 {
		return Build{}, ErrNotFound
	}
	in, targs := tenantIn(tenants)
	query := `SELECT ` + buildColumns + ` FROM builds WHERE input_hash = ? AND status IN ('queued', 'running')
		AND id != ? AND ` + in + ` ORDER BY seq LIMIT 1`
	list, err := queryBuilds(ctx, q, query, append([]any{h, except}, targs...)...)
	if err != nil {
		return Build{}, err
	}
	if len(list) == 0 {
		return Build{}, ErrNotFound
	}
	return list[0], nil
}

// FinishDeduped moves an unfinished build to succeeded with the result of
// the identical build it was answered by (b.DedupOf, b.ImageDigest, step
// counts, times). It reports false, changing nothing, if the build was
// already terminal.
func FinishDeduped(ctx context.Context, q Querier, b Build) (bool, error) {
	q = bind(q)
	res, err := q.ExecContext(ctx, `UPDATE builds SET status = 'succeeded', phase = 'done', dedup_of = ?, image_digest = ?,
		steps_total = ?, steps_cached = ?, started_at = ?, finished_at = ?
		WHERE id = ? AND status IN ('queued', 'running')`,
		b.DedupOf, b.ImageDigest, b.StepsTotal, b.StepsCached, micros(b.StartedAt), micros(b.FinishedAt), b.ID)
	if err != nil {
		return false, fmt.Errorf("finish build %s from %s: %w", b.ID, b.DedupOf, err)
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}
