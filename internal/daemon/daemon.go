// Package daemon assembles a kiln server from its parts: data dir, keys,
// database, registry, cache volumes, runtime, build service and HTTP. The
// serve command and the end-to-end tests start kiln through it, so both
// run the same wiring.
package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/builderimage"
	"github.com/kiln-build/kiln/internal/builders"
	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/ctxstore"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/rootfs"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/runtime/process"
	"github.com/kiln-build/kiln/internal/runtime/vm"
	"github.com/kiln-build/kiln/internal/server"
	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/tokens"
)

// buildkitVersion is the BuildKit module this binary was built with; a
// cache volume made by another version is wiped before use.
func buildkitVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, d := range info.Deps {
			if d.Path == "github.com/moby/buildkit" {
				return "buildkit " + d.Version
			}
		}
	}
	return "buildkit unknown"
}

// Serve listens on cfg.Listen and runs kiln until ctx is done.
func Serve(ctx context.Context, cfg config.Config) error {
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w (another kiln running? pick another with --listen)", cfg.Listen, err)
	}
	return Run(ctx, cfg, ln)
}

// Option changes how Run assembles the server.
type Option func(*options)

type options struct {
	runtime runtime.Runtime
}

// WithRuntime runs builds on rt instead of the runtime cfg names: the
// seam fast tests use to drive the whole server without BuildKit (the
// real runtimes are tested in internal/runtime/...).
func WithRuntime(rt runtime.Runtime) Option { return func(o *options) { o.runtime = rt } }

// Run serves kiln on ln until ctx is done, then shuts down: running
// builds are stopped and rerun on the next start.
func Run(ctx context.Context, cfg config.Config, ln net.Listener, opts ...Option) error {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	defer ln.Close()
	level := slog.LevelInfo
	level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	// Libraries that print through the standard logger (x/crypto's ssh
	// agent server, refusing a build's attempt to add a key) land in the
	// same structured log instead of bare lines on stderr.
	slog.SetDefault(log)

	host, err := config.ReadHost(cfg.DataDir)
	if err != nil {
		return err
	}
	warnings, err := cfg.CheckHost(host)
	if err != nil {
		return fmt.Errorf("configuration does not fit this host: %w", err)
	}
	for _, w := range warnings {
		log.Warn(w)
	}
	data, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(data, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	authority, created, err := auth.LoadOrCreate(filepath.Join(data, "keys"))
	if err != nil {
		return err
	}
	if created {
		log.Info("created the server signing key", "path", filepath.Join(data, "keys"))
	}
	db, err := store.Open(ctx, store.Location(cfg.Database, data))
	if err != nil {
		return err
	}
	log.Info("database open", "database", db.String()) // host and name only, never credentials
	defer db.Close()

	registryHost := cfg.RegistryHost
	if registryHost == "" {
		registryHost = loopbackAddr(ln.Addr().(*net.TCPAddr))
	}
	policy, err := access.New(access.Config{Shared: cfg.TenancyShared, TrustGroups: cfg.DedupTrustGroups, RegistryHost: registryHost},
		access.OwnersFunc(func(ctx context.Context, id string) (string, bool, error) { return store.BuildOwner(ctx, db.SQL, id) }))
	if err != nil {
		return fmt.Errorf("tenancy settings: %w", err)
	}
	toks, err := tokens.Open(ctx, db, authority, policy, cfg.TokensMaxTTL)
	if err != nil {
		return err
	}
	if err := ensureAdminToken(ctx, authority, toks, filepath.Join(data, "admin.token"), log); err != nil {
		return err
	}

	// Registry GC and writes exclude each other across every node on a
	// PostgreSQL database; a SQLite database has one node.
	var gate registry.Gate
	if db.Dialect() == store.Postgres {
		pg := db.RegistryGate()
		defer pg.Close()
		gate = pg
	}
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(data, "registry"), Authority: authority, Gate: gate,
		Storage: registry.StorageConfig{Driver: cfg.RegistryStorage, S3: registry.S3Config{
			Bucket: cfg.RegistryS3Bucket, Region: cfg.RegistryS3Region, RegionEndpoint: cfg.RegistryS3RegionEndpoint,
			ForcePathStyle: cfg.RegistryS3ForcePathStyle, AccessKey: cfg.RegistryS3AccessKey, SecretKey: cfg.RegistryS3SecretKey,
			RootDirectory: cfg.RegistryS3RootDir, Redirect: cfg.RegistryS3Redirect,
		}},
		Grant: policy.GrantRegistry, Logger: log.With("part", "registry")})
	if err != nil {
		return err
	}
	defer reg.Close()

	vols, err := cachevol.Open(filepath.Join(data, "cache"), cachevol.Config{
		DefaultSize: cfg.CacheVolumeSize, MaxTotalBytes: cfg.CacheMaxTotal, MaxCount: cfg.CacheMaxVolumes,
		Stamp: buildkitVersion(), Logger: log.With("part", "cachevol"),
	})
	if err != nil {
		return err
	}

	conv, err := rootfs.Open(filepath.Join(data, "images"), reg, rootfs.Options{})
	if err != nil {
		return err
	}
	defer conv.Close()
	imgs := images.New(db, reg, conv, policy, log.With("part", "images"))
	defer imgs.Close()
	imgs.SetBuilderDir(builderDir(cfg, data))
	// Pushes that landed in the registry while their records did not
	// (a crash between the two) are reflected before anything is served.
	if err := imgs.Reconcile(ctx); err != nil {
		return err
	}
	if err := imgs.Resume(ctx); err != nil {
		return err
	}

	creds := map[string]mirror.Credentials{}
	for host, c := range cfg.MirrorCredentials {
		creds[host] = mirror.Credentials{Username: c["username"], Password: c["password"], Token: c["token"]}
	}
	mir, err := mirror.New(mirror.Config{Registry: reg, Credentials: creds, Insecure: cfg.MirrorInsecure,
		Endpoints: cfg.MirrorEndpoints, Logger: log.With("part", "mirror")})
	if err != nil {
		return fmt.Errorf("mirror settings: %w", err)
	}

	// Builder VMs reach the registry through a listener of its own that
	// serves /v2/ and nothing else: a build step must not reach kiln's
	// API, metrics or health endpoints through its registry tunnel.
	regLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for builder registry traffic: %w", err)
	}
	defer regLn.Close()
	rt := o.runtime
	if rt == nil {
		if rt, err = newRuntime(cfg, data, regLn.Addr().String(), log); err != nil {
			return err
		}
	}

	pool := builders.New(builders.Config{IdleTimeout: cfg.BuildersIdleTimeout, MaxWarm: cfg.MaxWarm(hostMemory()),
		Logger: log.With("part", "builders")}, rt, vols)
	vols.SetIdleHolder(pool)
	defer pool.Close()

	contexts, err := ctxstore.Open(filepath.Join(data, "context-store"), ctxstore.Config{
		MaxBytesPerTenant: cfg.ContextStorePerTenant, MaxTotalBytes: cfg.ContextStoreTotal,
		MaxBlobBytes: cfg.ContextMaxUncompressedBytes, Logger: log.With("part", "contexts")})
	if err != nil {
		return err
	}

	svc, err := builds.New(builds.Config{
		DataDir:       data,
		RegistryHost:  registryHost,
		MaxConcurrent: cfg.MaxConcurrent,
		Context: buildcontext.Limits{MaxBytes: cfg.ContextMaxBytes, MaxUncompressedBytes: cfg.ContextMaxUncompressedBytes,
			MaxEntries: cfg.ContextMaxEntries},
		CPUs:               builds.Caps{Default: cfg.CPUsDefault, Max: cfg.CPUsMax},
		MemoryMB:           builds.Caps{Default: cfg.MemoryMBDefault, Max: cfg.MemoryMBMax},
		DiskGB:             builds.Caps{Default: cfg.DiskGBDefault, Max: cfg.DiskGBMax},
		TimeoutSec:         builds.Caps{Default: cfg.TimeoutSecDefault, Max: cfg.TimeoutSecMax},
		GCReservedPercent:  cfg.GCReservedPercent,
		GCMaxUsedPercent:   cfg.GCMaxUsedPercent,
		BuilderID:          builderID(rt),
		DedupTTL:           cfg.DedupTTL,
		NetworkDefault:     cfg.NetworkDefault,
		NetworkAllowed:     cfg.NetworkAllowed,
		ExternalRegistries: cfg.RegistriesAllowed,
		InsecureRegistries: cfg.RegistriesInsecure,
		URLContextsAllowed: cfg.ContextURLAllowed,
		Entitlements:       cfg.BuildsEntitlements,
		ClientGoneAfter:    cfg.BuildsClientGoneAfter,
		SSHSessionWait:     cfg.BuildsSSHSessionWait,
		SBOMGenerator:      cfg.AttestSBOMGenerator,
	}, builds.Deps{DB: db, Registry: reg, Images: imgs, Mirror: mir, Volumes: vols, Runtime: rt, Builders: pool, Contexts: contexts, Auth: authority, Policy: policy, Logger: log.With("part", "builds")})
	if err != nil {
		return err
	}
	if err := svc.Start(ctx); err != nil {
		return err
	}

	api := server.New(server.Deps{Auth: authority, Policy: policy, Tokens: toks, Builds: svc, Images: imgs, Volumes: vols, Builders: pool,
		Registry: reg, RegistryHost: registryHost, Heartbeat: cfg.SSEHeartbeat,
		UploadsGlobal: cfg.UploadsMax, UploadsPerTenant: cfg.UploadsPerTenant,
		MinUploadRate: cfg.HTTPMinUploadRate, UploadWindow: uploadWindow, Logger: log.With("part", "http"),
		BuilderImage: builderImageDigest(rt)})
	// No ReadTimeout or WriteTimeout: build contexts and event streams
	// are long. Slow request bodies are cut off by the upload rate check.
	srv := &http.Server{Handler: api, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: cfg.HTTPIdleTimeout}
	regSrv := &http.Server{Handler: api.RegistryOnly(), ReadHeaderTimeout: 30 * time.Second, IdleTimeout: cfg.HTTPIdleTimeout}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	go func() { errc <- regSrv.Serve(regLn) }()
	log.Info("kiln is serving", "api", "http://"+ln.Addr().String(), "registry", registryHost,
		"runtime", rt.Name(), "data", data, "buildkit", buildkitVersion())

	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down: running builds stop and rerun on next start")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	if err := svc.Stop(sctx); err != nil {
		log.Warn("stop builds", "err", err)
	}
	// Builders kept up between builds stop with their volumes unmounted.
	pool.Close()
	srv.Shutdown(sctx)
	regSrv.Shutdown(sctx)
	return nil
}

// hostMemory is the host's total memory in bytes (0 if unknown).
func hostMemory() int64 {
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		return 0
	}
	return int64(si.Totalram) * int64(si.Unit)
}

// uploadWindow is the span over which a request body must average
// http.min_upload_rate.
const uploadWindow = 30 * time.Second

// loopbackAddr turns a wildcard listen address into one a local builder
// can dial.
func loopbackAddr(a *net.TCPAddr) string {
	if a.IP.IsUnspecified() {
		return fmt.Sprintf("127.0.0.1:%d", a.Port)
	}
	return a.String()
}

// newRuntime picks the builder runtime. registryAddr is where the registry
// really listens; VM guests reach it through their registry tunnel. auto
// means vm whenever a builder image exists and QEMU can run it, and says
// why when it falls back to process.
func newRuntime(cfg config.Config, data, registryAddr string, log *slog.Logger) (runtime.Runtime, error) {
	rlog := log.With("part", "runtime")
	if cfg.Runtime != "process" {
		rt, err := newVMRuntime(cfg, data, registryAddr, rlog)
		switch {
		case err == nil:
			log.Info("builder runtime: vm", "requested", cfg.Runtime, "accelerator", rt.Accel(), "builder_image", rt.ImageDigest(), "image_dir", builderDir(cfg, data))
			return rt, nil
		case cfg.Runtime == "vm":
			return nil, err
		default:
			log.Warn("builder runtime: auto falls back to process", "reason", err)
		}
	}
	bk, err := findBuildkitd()
	if err != nil {
		return nil, err
	}
	rt, err := process.New(process.Config{BuildkitdPath: bk, StateDir: stateDir(data), Logger: rlog})
	if err != nil {
		return nil, err
	}
	log.Info("builder runtime: process (buildkitd on the host, no VM isolation)", "requested", cfg.Runtime, "accelerator", "none")
	return rt, nil
}

func newVMRuntime(cfg config.Config, data, registryAddr string, log *slog.Logger) (*vm.Runtime, error) {
	img, err := builderimage.Load(builderDir(cfg, data))
	if err != nil {
		return nil, fmt.Errorf("the vm runtime needs a builder image: %w", err)
	}
	// Its own state dir: the process runtime reaps everything in its one.
	return vm.New(vm.Config{Image: img, StateDir: stateDir(data) + "-vm", RegistryAddr: registryAddr,
		Unresponsive: cfg.VMUnresponsive, Logger: log})
}

// findBuildkitd looks beside the kiln binary first (make build puts both
// in bin/), then $KILN_BUILDKITD, then PATH.
func findBuildkitd() (string, error) {
	if p := os.Getenv("KILN_BUILDKITD"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "buildkitd")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("buildkitd"); err == nil {
		return p, nil
	}
	return "", errors.New("buildkitd not found beside kiln, in $KILN_BUILDKITD or on PATH: run make build (it builds bin/buildkitd from the BuildKit Go module)")
}

// ensureAdminToken writes an all-scopes token on first start so the
// operator can mint narrower tokens; it is the one secret kiln keeps on
// disk besides its signing key, readable by its owner only. It is
// recorded like any other token, so kiln token ls shows it and kiln token
// revoke stops it (delete the file and restart for a new one).
func ensureAdminToken(ctx context.Context, a *auth.Authority, toks *tokens.Service, path string, log *slog.Logger) error {
	if data, err := os.ReadFile(path); err == nil {
		// Written by an older kiln, or recorded already: make sure it is
		// listed. A revoked or expired one is the operator's to replace.
		if p, err := a.Verify(strings.TrimSpace(string(data))); err == nil {
			return toks.RecordPrincipal(ctx, p, time.Now().UTC())
		}
		return nil
	}
	spec := auth.TokenSpec{Subject: "admin", Scopes: auth.AllScopes, CacheScope: "admin", TTL: 10 * 365 * 24 * time.Hour}
	iss, err := a.Issue(spec)
	if err != nil {
		return fmt.Errorf("create admin token: %w", err)
	}
	if err := os.WriteFile(path, []byte(iss.Token+"\n"), 0o600); err != nil {
		return fmt.Errorf("write admin token: %w", err)
	}
	if err := toks.Record(ctx, spec, iss); err != nil {
		return err
	}
	log.Info("created an admin token; use it to mint narrower ones with kiln token create", "path", path, "token_id", iss.ID)
	return nil
}

// stateDir is where runtimes keep per-build mounts and sockets. It lives
// in the data dir unless that path is so long that a buildkitd socket
// below it would pass the 107-byte unix socket limit; then it moves to a
// short /run path derived from the data dir, so the same data dir always
// finds (and reaps) its own leftovers.
func stateDir(data string) string {
	dir := filepath.Join(data, "run")
	if len(dir) <= 40 {
		return dir
	}
	sum := sha256.Sum256([]byte(data))
	return filepath.Join("/run/kiln", hex.EncodeToString(sum[:6]))
}

// builderDir is where the builder VM image lives: it boots builds (vm
// runtime) and `kiln run`.
func builderDir(cfg config.Config, data string) string {
	if cfg.BuilderImage != "" {
		return cfg.BuilderImage
	}
	return filepath.Join(data, "builder")
}

// builderImageDigest is the digest of the builder VM image rt boots, or
// "" for a runtime without one.
func builderImageDigest(rt runtime.Runtime) string {
	if img, ok := rt.(interface{ ImageDigest() string }); ok {
		return img.ImageDigest()
	}
	return ""
}

// builderID names what executes builds, for the dedup key: the runtime,
// the BuildKit version and, for VM builders, the builder image digest.
func builderID(rt runtime.Runtime) string {
	id := rt.Name() + "/" + buildkitVersion()
	if img, ok := rt.(interface{ ImageDigest() string }); ok {
		id += "/" + img.ImageDigest()
	}
	return id
}
