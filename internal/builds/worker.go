package builds

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/builders"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/store"
)

// jobArgs is the River job of one build attempt. A job whose attempt is
// not the build's current one is stale (the build was requeued after a
// restart) and does nothing.
type jobArgs struct {
	BuildID string `json:"build_id"`
	Attempt int    `json:"attempt"`
}

func (jobArgs) Kind() string { return "kiln_build" }

// The build's own state machine owns retries; River runs each job once.
func (jobArgs) InsertOpts() river.InsertOpts { return river.InsertOpts{MaxAttempts: 1} }

type worker struct {
	river.WorkerDefaults[jobArgs]
	s *Service
}

// Timeout is disabled: a build's timeout counts only its running time and
// is enforced by run, not while it waits for its scope or a slot.
func (w *worker) Timeout(*river.Job[jobArgs]) time.Duration { return -1 }

func (w *worker) Work(ctx context.Context, job *river.Job[jobArgs]) error {
	w.s.run(ctx, job.Args.BuildID, job.Args.Attempt)
	return nil
}

// maxWaiting bounds how many builds may wait for their scope at once;
// waiting costs a goroutine, never a build slot.
const maxWaiting = 1000

func newRiver(s *Service) (*river.Client[*sql.Tx], error) {
	workers := river.NewWorkers()
	river.AddWorker(workers, &worker{s: s})
	return river.NewClient(s.db.RiverDriver(), &river.Config{
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: maxWaiting}},
		Workers:           workers,
		FetchCooldown:     50 * time.Millisecond,
		FetchPollInterval: 250 * time.Millisecond,
		Logger:            s.log.With("part", "queue"),
	})
}

func (s *Service) enqueue(ctx context.Context, tx *sql.Tx, id string, attempt int) error {
	if _, err := s.river.InsertTx(ctx, tx, jobArgs{BuildID: id, Attempt: attempt}, nil); err != nil {
		return fmt.Errorf("queue build %s: %w", id, err)
	}
	return nil
}

// Start migrates the queue tables, recovers builds a previous server left
// unfinished, and starts working the queue.
func (s *Service) Start(ctx context.Context) error {
	migrator, err := rivermigrate.New(s.db.RiverDriver(), nil)
	if err != nil {
		return fmt.Errorf("prepare queue migrations: %w", err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("migrate queue tables: %w", err)
	}
	if err := s.recover(ctx); err != nil {
		return err
	}
	if err := s.river.Start(ctx); err != nil {
		return fmt.Errorf("start queue: %w", err)
	}
	if s.cfg.ClientGoneAfter > 0 {
		go s.watchClients(s.watchStop)
	}
	fanoutCtx, stopFanout := context.WithCancel(context.Background())
	go func() {
		<-s.watchStop
		stopFanout()
	}()
	go s.fanout.Serve(fanoutCtx)
	return nil
}

// Stop stops taking builds and cancels running ones; they are requeued
// when the server starts again.
func (s *Service) Stop(ctx context.Context) error {
	if s.stopping.CompareAndSwap(false, true) {
		close(s.watchStop)
	}
	err := s.river.StopAndCancel(ctx)
	s.ssh.closeAll() // hijacked connections: the HTTP server's shutdown does not see them
	if c, ok := s.slots.(interface{ Close() }); ok {
		c.Close() // idle connections of shared slots
	}
	return err
}

// recover makes every build a previous server process left unfinished
// either queued again (under a new attempt) or failed with the reason.
// Builds with secrets, registry credentials or ssh agents cannot be
// rerun: those lived in memory only (or, for a forwarded agent, in the
// client's session, which the restart cut).
func (s *Service) recover(ctx context.Context) error {
	builds, err := store.Unfinished(ctx, s.db.SQL)
	if err != nil {
		return fmt.Errorf("find unfinished builds: %w", err)
	}
	keep := map[string]bool{}
	for _, b := range builds {
		was := b.Status
		if heldInMemory(b.Options) {
			if _, err := s.finish(b.ID, store.Outcome{Status: store.StatusFailed, Phase: "interrupted",
				Error: "the kiln server restarted before this build finished; its secrets, registry credentials and ssh agents were held only in memory (a forwarded agent, in its client's session) and are gone, so it cannot be rerun: submit it again"}); err != nil {
				return err
			}
			s.cleanup(b.ID)
			continue
		}
		keep[b.ID] = true
		err := s.db.InTx(ctx, func(tx *sql.Tx) error {
			attempt, err := store.Requeue(ctx, tx, b.ID)
			if err != nil {
				return err
			}
			return s.enqueue(ctx, tx, b.ID, attempt)
		})
		if err != nil {
			return fmt.Errorf("requeue build %s after restart: %w", b.ID, err)
		}
		if was == store.StatusRunning {
			s.message(b.ID, "the kiln server restarted while this build was running; it was queued again and will rerun")
			s.emit(b.ID, Event{Status: store.StatusQueued, Event: eventOfKind(KindStatus)})
		}
		s.log.Info("requeued unfinished build after restart", "build", b.ID, "was", was)
	}
	// Uploads cut short by the crash left context directories behind.
	entries, _ := os.ReadDir(contextsDir(s.cfg.DataDir))
	for _, e := range entries {
		id := strings.TrimSuffix(e.Name(), ".dockerfile")
		if !keep[id] {
			os.RemoveAll(s.contextDir(e.Name()))
		}
	}
	return nil
}

var errTimeout = errors.New("build timed out")

// run executes one build attempt from queue to terminal state.
func (s *Service) run(ctx context.Context, id string, attempt int) {
	b, err := s.load(ctx, id)
	if err != nil || b.Status != store.StatusQueued || b.Attempt != attempt {
		return
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	a := &activeBuild{cancel: cancel, done: make(chan struct{})}
	s.activeMu.Lock()
	s.active[id] = a
	s.activeMu.Unlock()
	defer func() {
		s.activeMu.Lock()
		delete(s.active, id)
		s.activeMu.Unlock()
		close(a.done)
	}()

	outcome, ran := s.execute(ctx, b)
	switch {
	case context.Cause(ctx) == errCanceled:
		// Cancel already recorded the terminal state; it returns once
		// this run is done, so after the cleanup below.
	case s.stopping.Load() && ctx.Err() != nil:
		// Server shutdown: leave it unfinished, context and all; recover
		// requeues it.
		s.log.Info("build interrupted by shutdown; it will rerun on next start", "build", id)
		return
	case ran || outcome.Status != "":
		// Nothing runs the build any more: what it left on disk goes
		// before its end is visible, so a client that saw it end finds
		// nothing left behind.
		s.cleanup(id)
		if _, err := s.finish(id, outcome); err != nil {
			s.log.Error("record build outcome", "build", id, "err", err)
		}
		return
	}
	s.cleanup(id)
}

// execute waits for the build's volume and a slot, then runs it. ran is
// false when the build never started (canceled while waiting, or lost the
// race to start).
func (s *Service) execute(ctx context.Context, b Build) (o store.Outcome, ran bool) {
	id := b.ID
	att, _ := s.secrets.Load(id)
	mem, _ := att.(*attachment)
	if needsAttachment(b.Options) && mem == nil {
		return store.Outcome{Status: store.StatusFailed, Phase: "interrupted",
			Error: "this build's secrets, registry credentials and ssh key files were held only in memory and are gone (the server restarted); submit it again"}, false
	}
	if o, ok := s.awaitSSH(ctx, b); !ok {
		return o, false
	}

	if b.Options.Follows != "" && s.awaitLeader(ctx, b) {
		return store.Outcome{}, false // answered from the leader's result
	}
	if ctx.Err() != nil {
		return store.Outcome{}, false
	}
	lease, err := s.lease(ctx, b)
	if err != nil {
		if ctx.Err() != nil {
			return store.Outcome{}, false
		}
		return store.Outcome{Status: store.StatusFailed, Phase: "failed", Error: err.Error()}, false
	}
	defer lease.Release()
	vol := lease.Volume()

	if err := store.EnterSlotLine(ctx, s.db.SQL, id, b.Attempt); err != nil {
		s.log.Warn("record the build's place in line", "build", id, "err", err)
	}
	releaseSlot, err := s.slots.Acquire(ctx, func() { s.phase(id, "waiting for a build slot") })
	if err != nil {
		return store.Outcome{}, false
	}
	defer releaseSlot()

	started := time.Now().UTC()
	ok, err := store.StartBuild(ctx, s.db.SQL, id, b.Attempt, s.runtime.Name(), started)
	if err != nil || !ok {
		return store.Outcome{}, false
	}
	s.emit(id, Event{Status: store.StatusRunning, Event: eventOfKind(KindStatus)})
	switch {
	case vol.IsScratch():
		s.message(id, "using a fresh %d GiB scratch volume (no_cache)", b.Options.DiskGB)
	case lease.WasWarm:
		s.message(id, "using warm cache volume of scope %q, attached to the scope's running builder", b.CacheScope)
	case vol.Wiped():
		s.message(id, "cache of scope %q was wiped: %s", b.CacheScope, vol.WipeReason())
	case vol.Created():
		s.message(id, "created cache volume for scope %q", b.CacheScope)
	default:
		s.message(id, "using warm cache volume of scope %q", b.CacheScope)
	}

	job, err := s.job(b, vol, mem)
	if err != nil {
		return store.Outcome{Status: store.StatusFailed, Phase: "failed", Error: err.Error()}, true
	}
	if err := s.fetchBases(ctx, b, &job); err != nil {
		if context.Cause(ctx) == errCanceled {
			return store.Outcome{}, true
		}
		return store.Outcome{Status: store.StatusFailed, Phase: "failed", Error: err.Error()}, true
	}
	timeout := time.Duration(b.Options.TimeoutSeconds) * time.Second
	rctx, rcancel := context.WithTimeoutCause(ctx, timeout, errTimeout)
	defer rcancel()
	sink := &buildSink{s: s, id: id}
	s.metrics.runtimeRun()
	runStart := time.Now()
	res, rep, err := lease.Run(rctx, job, sink)
	runEnd := time.Now()
	s.metrics.observeDuration(time.Since(started))
	o = store.Outcome{StepsTotal: sink.total(), StepsCached: sink.cached(), BuilderReused: rep.Reused,
		Timings: timings(b.CreatedAt, started, runStart, sink.solvingAt(), runEnd, res.Timings)}
	defer func() { s.metrics.observePhases(s.runtime.Name(), o) }()
	switch {
	case context.Cause(ctx) == errCanceled:
		return store.Outcome{}, true
	case context.Cause(rctx) == errTimeout:
		o.Status, o.Phase = store.StatusFailed, "timed out"
		o.Error = fmt.Sprintf("the build ran longer than its timeout of %s and was stopped; raise timeout_seconds (the cap is %d s)", timeout, s.cfg.TimeoutSec.Max)
		return o, true
	case err != nil:
		o.Status, o.Phase, o.Error = store.StatusFailed, "failed", err.Error()
		return o, true
	}
	if b.Options.Call == solve.CallCheck {
		// The checks ran: the build succeeded, whatever they found; the
		// client decides what warnings mean for it (kiln build exits 1).
		o.Status, o.Phase = store.StatusSucceeded, "checked"
		if res.Check != nil {
			o.Check = &store.Check{Warnings: res.Check.Warnings, Report: res.Check.Report, Error: res.Check.Error}
		}
		return o, true
	}
	if err := s.recordImages(ctx, b, res.Digest); err != nil {
		o.Status, o.Phase, o.Error = store.StatusFailed, "failed", err.Error()
		return o, true
	}
	s.metrics.observeSteps(res.StepsTotal, res.StepsCached)
	o.Status, o.Phase, o.ImageDigest = store.StatusSucceeded, "done", res.Digest
	o.StepsTotal, o.StepsCached = res.StepsTotal, res.StepsCached
	return o, true
}

// timings splits a build's time into phases, in seconds: queued (from
// submission to start, waiting for its scope and a slot included),
// builder_start (from handing the job over until the solve began: boot,
// buildkitd start, mount; near zero on a reused builder), solve (the rest
// of the run), and the solve's own parts BuildKit reports (context
// transfer, export, push).
func timings(created, started, runStart, solving, runEnd time.Time, solveTimings map[string]time.Duration) map[string]float64 {
	t := map[string]float64{store.TimingQueued: started.Sub(created).Seconds()}
	if !solving.IsZero() {
		t[store.TimingBuilderStart] = solving.Sub(runStart).Seconds()
		t[store.TimingSolve] = runEnd.Sub(solving).Seconds()
	}
	for name, d := range solveTimings {
		t[name] = d.Seconds()
	}
	return t
}

// lease takes the build's scope (its cache volume, and its builder when
// one is kept up), waiting for the scope's current build if needed, or a
// scratch volume for no_cache builds.
func (s *Service) lease(ctx context.Context, b Build) (*builders.Lease, error) {
	if b.Options.NoCache || b.CacheScope == "" {
		return s.builders.Scratch(ctx, int64(b.Options.DiskGB)<<30)
	}
	return s.builders.Acquire(ctx, b.CacheScope, func() {
		s.phase(b.ID, "waiting for cache scope")
		s.message(b.ID, "another build of cache scope %q is running; waiting for it (builds of one scope share one cache volume, one at a time)", b.CacheScope)
	})
}

// job assembles the runtime's view of a build.
func (s *Service) job(b Build, vol *cachevol.Volume, mem *attachment) (runtime.Job, error) {
	host := s.cfg.RegistryHost
	push := []string{host + "/" + canonicalName(b.ID)}
	access := []auth.Access{
		{Repository: "*", Actions: []string{"pull"}},
		{Repository: "builds/" + b.ID, Actions: []string{"pull", "push"}},
	}
	for _, t := range b.Tags {
		push = append(push, host+"/"+t)
		repo := t[:strings.LastIndex(t, ":")]
		access = append(access, auth.Access{Repository: repo, Actions: []string{"pull", "push"}})
	}
	// The build acts for its tenant, pulling what the tenant may pull and
	// pushing only its own names (authorized at submission); an admin's
	// build keeps the admin's reach.
	scopes := []auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite}
	if b.Options.Admin {
		scopes = append(scopes, auth.ScopeBuildAdmin)
	}
	if b.Options.Call == solve.CallCheck {
		push = nil // a check builds no image
	}
	req := solve.Request{
		Call:           b.Options.Call,
		Entitlements:   b.Options.Entitlements,
		ContextDir:     s.contextDir(b.ID),
		DockerfileDir:  s.contextDir(b.ID),
		DockerfileName: b.Options.DockerfilePath,
		ContextKey:     b.Options.ContextKey,
		ContextURL:     b.Options.ContextURL,
		BuildArgs:      b.Options.BuildArgs,
		Target:         b.Options.Target,
		Platforms:      b.Options.Platforms,
		NoCache:        b.Options.NoCache,
		Pull:           b.Options.Pull,
		Push:           push,
		Labels:         b.Options.Labels,
		Annotations:    b.Options.Annotations,
		AddHosts:       b.Options.AddHosts,
		ShmSize:        b.Options.ShmSize,
		Ulimits:        b.Options.Ulimits,
		Attests:        s.attestAttrs(b.Options),
	}
	if b.Options.InlineDockerfile {
		req.DockerfileDir = s.contextDir(b.ID) + ".dockerfile"
	}
	if b.Options.ContextURL != "" {
		// The builder fetches the context; only an inline Dockerfile
		// travels from here.
		req.ContextDir = ""
		req.InlineDockerfile = b.Options.InlineDockerfile
		if !b.Options.InlineDockerfile {
			req.DockerfileDir = ""
		}
	}
	insecure := []string{host}
	for _, ref := range b.Options.ExternalPush {
		req.Push = append(req.Push, ref)
		insecure = s.addPlainHTTP(insecure, ref)
	}
	for _, c := range b.Options.CacheFrom {
		req.CacheImports = append(req.CacheImports, c.Ref)
		insecure = s.addPlainHTTP(insecure, c.Ref)
	}
	if c := b.Options.CacheTo; c != nil {
		req.CacheExport, req.CacheExportMode = c.Ref, c.Mode
		insecure = s.addPlainHTTP(insecure, c.Ref)
		if c.KilnRepo != "" {
			access = append(access, auth.Access{Repository: c.KilnRepo, Actions: []string{"pull", "push"}})
		}
	}
	for _, n := range b.Options.NamedContexts {
		if n.Kind == store.NamedLocal {
			i, err := strconv.Atoi(n.Source)
			if err != nil {
				return runtime.Job{}, fmt.Errorf("named context %s: bad directory index %q", n.Name, n.Source)
			}
			if req.LocalContexts == nil {
				req.LocalContexts = map[string]string{}
			}
			req.LocalContexts[n.Name] = namedDir(s.contextDir(b.ID), i)
			continue
		}
		if req.NamedContexts == nil {
			req.NamedContexts = map[string]string{}
		}
		req.NamedContexts[n.Name] = n.Source
		if ref, ok := strings.CutPrefix(n.Source, "docker-image://"); ok {
			insecure = s.addPlainHTTP(insecure, ref)
		}
	}
	req.RegistryAuth = map[string]solve.Credentials{}
	if mem != nil {
		req.Secrets = mem.secrets
		for h, c := range mem.registryAuth {
			req.RegistryAuth[h] = c
		}
	}
	var err error
	if req.SSH, req.SSHAgent, err = s.sshAgents(b, mem); err != nil {
		return runtime.Job{}, err
	}
	if k := b.Options.GlobalCacheKey; k != "" {
		ref := host + "/cache/global/" + k + ":cache"
		req.CacheImports = append(req.CacheImports, ref)
		if b.Options.GlobalCacheExport && b.Options.Admin {
			req.CacheExport, req.CacheExportMode = ref, "max"
			access = append(access, auth.Access{Repository: "cache/global/" + k, Actions: []string{"pull", "push"}})
		}
	}
	ttl := time.Duration(b.Options.TimeoutSeconds)*time.Second + 10*time.Minute
	token, err := s.auth.Issue(auth.TokenSpec{Subject: "build:" + b.ID, Scopes: scopes, Namespace: b.Tenant,
		CacheScope: b.CacheScope, TTL: ttl, Access: access, Build: b.ID})
	if err != nil {
		return runtime.Job{}, fmt.Errorf("mint the build's registry credentials: %w", err)
	}
	// Set last: kiln's own registry only ever gets the build's token.
	req.RegistryAuth[host] = solve.Credentials{Username: "kiln", Password: token.Token}
	size := vol.Size()
	return runtime.Job{
		BuildID: b.ID,
		Solve:   req,
		Volume:  vol.Path(),
		GC: runtime.GCPolicy{
			ReservedSpace: strconv.FormatInt(size*int64(s.cfg.GCReservedPercent)/100, 10),
			MaxUsedSpace:  strconv.FormatInt(size*int64(s.cfg.GCMaxUsedPercent)/100, 10),
		},
		Registry:           host,
		InsecureRegistries: insecure,
		AllowedRegistries:  s.cfg.ExternalRegistries,
		CPUs:               b.Options.CPUs,
		MemoryMB:           b.Options.MemoryMB,
		Network:            b.Options.Network,
		AllowedDomains:     b.Options.AllowedDomains,
		Entitlements:       b.Options.Entitlements,
	}, nil
}

// addPlainHTTP adds ref's registry to hosts when the builder reaches it
// over plain HTTP.
func (s *Service) addPlainHTTP(hosts []string, ref string) []string {
	h, ok := s.policy.ExternalHost(ref)
	if !ok || !s.plainHTTP(h) || slices.Contains(hosts, h) {
		return hosts
	}
	return append(hosts, h)
}

// canonicalName is the name every build's result gets.
func canonicalName(id string) string { return "builds/" + id + ":latest" }

// CanonicalName is the repository:tag every build is pushed to.
func CanonicalName(id string) string { return canonicalName(id) }

// recordImages points the build's names at its digest.
func (s *Service) recordImages(ctx context.Context, b Build, digest string) error {
	if digest == "" {
		return errors.New("BuildKit reported no image digest for the pushed result")
	}
	if err := s.db.InTx(ctx, func(tx *sql.Tx) error { return putImages(ctx, tx, b, digest) }); err != nil {
		return err
	}
	s.images.Convert(digest)
	return nil
}

func putImages(ctx context.Context, tx *sql.Tx, b Build, digest string) error {
	now := time.Now().UTC()
	for _, name := range append([]string{canonicalName(b.ID)}, b.Tags...) {
		i := strings.LastIndex(name, ":")
		if err := store.PutImage(ctx, tx, store.Image{Name: name, Repository: name[:i], Tag: name[i+1:],
			Digest: digest, BuildID: b.ID, CreatedAt: now}); err != nil {
			return err
		}
	}
	return nil
}

// buildSink persists runtime progress as build events and keeps live
// step counts on the record.
type buildSink struct {
	s  *Service
	id string

	mu       sync.Mutex
	done     map[string]bool // vertex → cached
	nDone    atomic.Int64
	nCached  atomic.Int64
	lastSave time.Time
	solving  time.Time // when the runtime reported the solve began
}

// solvingPhase is the phase both runtimes report when the solve begins.
const solvingPhase = "solving"

func (k *buildSink) Emit(e progress.Event) {
	switch e.Kind {
	case progress.Phase:
		if e.Phase == solvingPhase {
			k.mu.Lock()
			if k.solving.IsZero() {
				k.solving = time.Now()
			}
			k.mu.Unlock()
		}
		k.s.phase(k.id, e.Phase)
		return
	case progress.VertexCached, progress.VertexCompleted:
		k.mu.Lock()
		if k.done == nil {
			k.done = map[string]bool{}
		}
		if _, seen := k.done[e.Vertex]; !seen {
			k.done[e.Vertex] = e.Kind == progress.VertexCached
			k.nDone.Add(1)
			if e.Kind == progress.VertexCached {
				k.nCached.Add(1)
			}
		}
		save := time.Since(k.lastSave) > 500*time.Millisecond
		if save {
			k.lastSave = time.Now()
		}
		k.mu.Unlock()
		if save {
			store.SetSteps(context.Background(), k.s.db.SQL, k.id, k.total(), k.cached())
		}
	}
	k.s.emit(k.id, Event{Event: e})
}

func (k *buildSink) solvingAt() time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.solving
}

func (k *buildSink) total() int  { return int(k.nDone.Load()) }
func (k *buildSink) cached() int { return int(k.nCached.Load()) }

// fetchBases makes sure the build's pinned base images from other
// registries are in kiln's mirror, and points BuildKit at every base in
// kiln's registry by the digest pinned at submission: a named-context
// override per image, so a tag moved while the build was queued cannot
// change what it builds on (and what its input hash claims).
func (s *Service) fetchBases(ctx context.Context, b Build, job *runtime.Job) error {
	if err := s.ensureGenerator(ctx, b); err != nil {
		return fmt.Errorf("fetch the sbom scanner %s: %w", b.Options.SBOM.Generator.Upstream, err)
	}
	if len(b.Options.Bases) == 0 {
		return nil
	}
	if job.Solve.NamedContexts == nil {
		job.Solve.NamedContexts = map[string]string{}
	}
	for _, bp := range b.Options.Bases {
		p := mirror.Pinned{Upstream: bp.Upstream, LocalRepo: bp.LocalRepo, Digest: bp.Digest, FromUpstream: bp.FromUpstream}
		if bp.Local {
			job.Solve.NamedContexts[p.ContextName()] = "docker-image://" + p.LocalRef(s.cfg.RegistryHost)
			continue
		}
		s.phase(b.ID, "fetching base images")
		var last time.Time
		err := s.mirror.EnsureFor(ctx, p, b.Options.Platforms, func(done, total int64) {
			if time.Since(last) > 2*time.Second || done == total {
				last = time.Now()
				s.message(b.ID, "base image %s: %d of %d bytes in kiln's mirror", bp.Upstream, done, total)
			}
		})
		if err != nil {
			return fmt.Errorf("fetch base image %s: %w", bp.Upstream, err)
		}
		job.Solve.NamedContexts[p.ContextName()] = "docker-image://" + p.LocalRef(s.cfg.RegistryHost)
	}
	return nil
}
