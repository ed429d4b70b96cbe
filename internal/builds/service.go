package builds

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/riverqueue/river"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/builders"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/ctxstore"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/store"
)

// Build is a build record; the store owns its shape.
type Build = store.Build

// Errors of the build service, in errdefs' classes.
var (
	ErrNotFound = fmt.Errorf("build %w", errdefs.ErrNotFound)
	// ErrFinished: the build is already terminal; the returned build is
	// its final state.
	ErrFinished = fmt.Errorf("build already finished: %w", errdefs.ErrConflict)
)

func badRequest(format string, args ...any) error { return errdefs.Invalid(format, args...) }

func forbidden(format string, args ...any) error { return errdefs.Forbidden(format, args...) }

// Caps bounds one resource: what a build gets when it asks for nothing,
// and the most it may ask for.
type Caps struct {
	Default int
	Max     int
}

// Config is the build service's configuration.
type Config struct {
	DataDir string
	// RegistryHost is kiln's registry as the builder reaches it
	// (host:port); results are pushed to RegistryHost/builds/<id>.
	RegistryHost string
	// MaxConcurrent builds run at once across all scopes.
	MaxConcurrent int
	Context       buildcontext.Limits
	CPUs          Caps
	MemoryMB      Caps
	DiskGB        Caps
	TimeoutSec    Caps
	// GCReservedPercent and GCMaxUsedPercent bound BuildKit's GC as
	// shares of the cache volume's size.
	GCReservedPercent int
	GCMaxUsedPercent  int
	// BuilderID names what executes builds (runtime, BuildKit version,
	// builder image digest); it is part of the dedup input hash.
	BuilderID string
	// DedupTTL is how long a succeeded build answers identical ones; 0
	// turns dedup off.
	DedupTTL time.Duration
	// NetworkDefault is the mode of builds that ask for none;
	// NetworkAllowed the modes builds may ask for.
	NetworkDefault string
	NetworkAllowed []string
	// CancelGrace is how long a cancel waits for the runtime to stop.
	CancelGrace time.Duration
	// ExternalRegistries are the registries other than kiln's that builds
	// may push to and use as caches (host, host:port, *.domain, or *);
	// InsecureRegistries those of them reached over plain HTTP besides
	// loopback ones.
	ExternalRegistries []string
	InsecureRegistries []string
	// URLContextsAllowed are the hosts the server downloads http(s)
	// contexts from (patterns as ExternalRegistries).
	URLContextsAllowed []string
	// Entitlements are the insecure entitlements builds may ask for
	// (network.host, security.insecure).
	Entitlements []string
	// ClientGoneAfter: an attached build (see Attach) with no event
	// stream open for this long is canceled; 0 turns that off.
	ClientGoneAfter time.Duration
	// SBOMGenerator is the SBOM scanner image of an sbom attestation
	// that names none (attest.sbom_generator).
	SBOMGenerator string
	// SSHSessionWait bounds how long a build that forwards its client's
	// ssh agent waits for the client's ssh session
	// (builds.ssh_session_wait); 0 means DefaultSSHSessionWait.
	SSHSessionWait time.Duration
}

// Service runs builds.
type Service struct {
	cfg      Config
	db       *store.DB
	river    *river.Client[*sql.Tx]
	reg      *registry.Registry
	images   *images.Service
	mirror   *mirror.Mirror
	volumes  *cachevol.Manager
	builders *builders.Pool
	contexts *ctxstore.Store
	runtime  runtime.Runtime
	auth     *auth.Authority
	policy   *access.Policy
	log      *slog.Logger
	hub      *hub
	fanout   Fanout
	slots    Slots
	metrics  *metrics
	secrets  sync.Map // build id → *attachment, memory only
	ssh      sshSessions
	activeMu sync.Mutex
	active   map[string]*activeBuild
	stopping atomic.Bool
	// watchStop ends watchClients and the fanout; closed by Stop.
	watchStop chan struct{}
}

type activeBuild struct {
	cancel context.CancelCauseFunc
	done   chan struct{}
}

// Deps are the parts a Service drives.
type Deps struct {
	DB       *store.DB
	Registry *registry.Registry
	Images   *images.Service
	// Mirror serves base images from other registries; nil: none.
	Mirror  *mirror.Mirror
	Volumes *cachevol.Manager
	Runtime runtime.Runtime
	// Builders keeps scopes' builders up between builds; nil: a pool
	// that keeps none.
	Builders *builders.Pool
	// Contexts is the content store contexts are materialized from when
	// sent as manifests; nil: only tar uploads.
	Contexts *ctxstore.Store
	Auth     *auth.Authority
	// Policy decides what each tenant sees and may name.
	Policy *access.Policy
	Logger *slog.Logger
}

// New creates the service; Start begins running queued builds.
func New(cfg Config, d Deps) (*Service, error) {
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 1
	}
	if cfg.CancelGrace <= 0 {
		cfg.CancelGrace = 30 * time.Second
	}
	if d.Logger == nil {
		d.Logger = slog.Default()
	}
	for _, dir := range []string{contextsDir(cfg.DataDir)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", dir, err)
		}
	}
	s := &Service{
		cfg:      cfg,
		db:       d.DB,
		reg:      d.Registry,
		images:   d.Images,
		mirror:   d.Mirror,
		volumes:  d.Volumes,
		builders: d.Builders,
		contexts: d.Contexts,
		runtime:  d.Runtime,
		auth:     d.Auth,
		policy:   d.Policy,
		log:      d.Logger,
		hub:      newHub(),
		slots:    newSlots(d.DB, cfg.MaxConcurrent, d.Logger.With("part", "slots")),
		active:   map[string]*activeBuild{},

		watchStop: make(chan struct{}),
	}
	s.fanout = newFanout(d.DB, s.hub, d.Logger.With("part", "events"))
	if s.builders == nil {
		s.builders = builders.New(builders.Config{Logger: d.Logger}, d.Runtime, d.Volumes)
	}
	s.metrics = newMetrics(s)
	rc, err := newRiver(s)
	if err != nil {
		return nil, err
	}
	s.river = rc
	return s, nil
}

func contextsDir(dataDir string) string { return filepath.Join(dataDir, "contexts") }

func (s *Service) contextDir(id string) string { return filepath.Join(contextsDir(s.cfg.DataDir), id) }

// RuntimeName says which runtime runs builds.
func (s *Service) RuntimeName() string { return s.runtime.Name() }

// Get loads a build pr may see; another tenant's build is not found.
func (s *Service) Get(ctx context.Context, pr auth.Principal, id string) (Build, error) {
	b, err := s.load(ctx, id)
	if err != nil {
		return Build{}, err
	}
	if !s.policy.SeeBuild(pr, b.Tenant) {
		return Build{}, fmt.Errorf("%w: no build %s", ErrNotFound, id)
	}
	return b, nil
}

// load reads a build whoever owns it.
func (s *Service) load(ctx context.Context, id string) (Build, error) {
	if !validID(id) {
		return Build{}, fmt.Errorf("%w: no build %s", ErrNotFound, errdefs.Quote(id))
	}
	b, err := store.GetBuild(ctx, s.db.SQL, id)
	if errors.Is(err, store.ErrNotFound) {
		return Build{}, fmt.Errorf("%w: no build %s", ErrNotFound, id)
	}
	return b, err
}

// QueuePosition is the build's 1-based place among queued builds, or 0
// when it is not queued.
func (s *Service) QueuePosition(ctx context.Context, b Build) (int, error) {
	if b.Status != store.StatusQueued {
		return 0, nil
	}
	return store.QueuePosition(ctx, s.db.SQL, b.ID)
}

// List returns the builds pr may see, newest first: its tenant's, or
// every tenant's for an admin.
func (s *Service) List(ctx context.Context, pr auth.Principal, f store.ListFilter) ([]Build, error) {
	if f.Status != "" && !validStatus(f.Status) {
		return nil, badRequest("unknown status %s: use queued, running, succeeded, failed or canceled", errdefs.Quote(f.Status))
	}
	f.Tenant = ""
	if !s.policy.SeeBuild(pr, "") {
		f.Tenant = pr.Tenant
	}
	return store.ListBuilds(ctx, s.db.SQL, f)
}

func validStatus(s string) bool {
	switch s {
	case store.StatusQueued, store.StatusRunning, store.StatusSucceeded, store.StatusFailed, store.StatusCanceled:
		return true
	}
	return false
}

// Cancel stops a queued or running build and waits (bounded) until its
// runtime has stopped. On a terminal build it returns ErrFinished with the
// final state.
func (s *Service) Cancel(ctx context.Context, pr auth.Principal, id string) (Build, error) {
	b, err := s.Get(ctx, pr, id)
	if err != nil {
		return Build{}, err
	}
	return s.stop(ctx, b, store.Outcome{Status: store.StatusCanceled, Error: "canceled by request", Phase: "canceled"})
}

// stop records outcome o (canceled) for build b and stops its runtime,
// waiting at most CancelGrace.
func (s *Service) stop(ctx context.Context, b Build, o store.Outcome) (Build, error) {
	id := b.ID
	if store.Terminal(b.Status) {
		return b, ErrFinished
	}
	won, err := s.finish(b.ID, o)
	if err != nil {
		return Build{}, err
	}
	if !won {
		b, err = s.load(ctx, id)
		if err != nil {
			return Build{}, err
		}
		return b, ErrFinished
	}
	s.activeMu.Lock()
	a := s.active[id]
	s.activeMu.Unlock()
	if a != nil {
		a.cancel(errCanceled)
		select {
		case <-a.done:
		case <-time.After(s.cfg.CancelGrace):
			s.log.Warn("canceled build still stopping", "build", id, "waited", s.cfg.CancelGrace)
		case <-ctx.Done():
		}
	} else {
		s.cleanup(id)
	}
	return s.load(ctx, id)
}

var errCanceled = errors.New("canceled by request")

// finish moves a build to a terminal state, once. Only the winner emits
// the closing events, so every build has exactly one end event.
func (s *Service) finish(id string, o store.Outcome) (bool, error) {
	won, err := store.FinishBuild(context.Background(), s.db.SQL, id, o, time.Now().UTC())
	if err != nil || !won {
		return won, err
	}
	s.secrets.Delete(id)
	s.ssh.end(id)
	s.hub.detach(id)
	if o.Error != "" && o.Status != store.StatusSucceeded {
		s.message(id, "%s: %s", o.Status, o.Error)
	}
	s.emit(id, Event{Status: o.Status, Event: eventOfKind(KindStatus)})
	s.emit(id, Event{Status: o.Status, Event: eventOfKind(KindEnd)})
	s.metrics.finished(id, o)
	return true, nil
}

// cleanup removes what a build left on disk once nothing runs it.
func (s *Service) cleanup(id string) {
	if err := os.RemoveAll(s.contextDir(id)); err != nil {
		s.log.Warn("remove build context", "build", id, "err", err)
	}
	if err := os.RemoveAll(s.contextDir(id) + ".dockerfile"); err != nil {
		s.log.Warn("remove inline Dockerfile", "build", id, "err", err)
	}
	if err := os.RemoveAll(s.contextDir(id) + ".named"); err != nil {
		s.log.Warn("remove named contexts", "build", id, "err", err)
	}
}

// Pause takes every build slot — on PostgreSQL every node's — waiting
// for running builds to finish; queued builds wait until resume is
// called. Registry garbage collection runs paused: a running build may
// have pushed layers whose manifest is not there yet, and a collection
// would take them.
func (s *Service) Pause(ctx context.Context) (resume func(), err error) {
	release, err := s.slots.AcquireAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("wait for running builds to finish: %w", err)
	}
	return release, nil
}
