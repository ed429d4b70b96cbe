package buildkitd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/docker/go-units"
	"github.com/moby/buildkit/client"
	"github.com/pelletier/go-toml/v2"

	"github.com/kiln-build/kiln/internal/tail"
)

// GCPolicy bounds BuildKit's garbage collection. Fields hold BuildKit size
// strings ("18GB", "2GiB") or a percentage of the root's filesystem ("10%");
// a bare integer means bytes; empty keeps buildkitd's default.
type GCPolicy struct {
	ReservedSpace string `json:"reserved_space,omitempty"`
	MaxUsedSpace  string `json:"max_used_space,omitempty"`
	MinFreeSpace  string `json:"min_free_space,omitempty"`
}

// Config describes one buildkitd instance.
type Config struct {
	// Binary is the buildkitd executable.
	Binary string
	// Root is buildkitd's state root (the mounted cache volume).
	Root string
	// Dir holds the daemon's socket, config, pid file and temp files; it
	// must exist and must not be on the volume.
	Dir string
	// Runc is the OCI runtime binary the worker runs steps with.
	Runc string
	// GC bounds BuildKit's garbage collection; empty fields keep
	// buildkitd's defaults, which are relative to Root's filesystem.
	GC GCPolicy
	// InsecureRegistries are hosts buildkitd reaches over plain HTTP.
	InsecureRegistries []string
	// CgroupParent is the cgroup every build step runs under, so leftover
	// step processes can be found and killed after the daemon is gone.
	CgroupParent string
	// StepMemoryBytes caps the memory of all build steps together (they
	// run under CgroupParent); 0 leaves them uncapped. Where the daemon
	// runs in a VM sized for the build, the VM is the cap.
	StepMemoryBytes int64
	// MaxParallelism caps concurrently running steps (0: unlimited).
	MaxParallelism int
	// NoHistory turns BuildKit's build history off. The history keeps
	// every step's output, unmasked, in the content store below Root, so a
	// step that prints a secret would leave it on the cache volume.
	NoHistory bool
	// Proxy, when set, is the HTTP(S) proxy the daemon uses for what it
	// fetches itself (ADD <url>, git sources, and registries it reaches by
	// a name not in NoProxy); loopback stays direct.
	Proxy string
	// NoProxy are host names the daemon reaches directly although Proxy
	// is set: in a builder VM, the registry names its hosts file maps to
	// tunnels inside the guest. Each also covers the names below it
	// (NO_PROXY's rule, in Go as in curl). Only with Proxy.
	NoProxy []string
	// Entitlements are the insecure entitlements the daemon grants a
	// solve that asks for them (network.host, security.insecure); none
	// unless the operator allowed them for the build.
	Entitlements []string
	// StartTimeout bounds the wait for the daemon to answer (default 60s).
	StartTimeout time.Duration
	Logger       *slog.Logger
}

// Daemon is a running buildkitd.
type Daemon struct {
	cfg    Config
	addr   string
	cmd    *exec.Cmd
	stderr *tail.Buffer
	client *client.Client

	exited  chan struct{} // closed when the process was reaped
	waitErr error

	stopOnce sync.Once
	stopErr  error
}

const (
	socketName  = "buildkitd.sock"
	configName  = "buildkitd.toml"
	pidFileName = "buildkitd.pid"
	// stderrTail is how much of buildkitd's stderr is kept for errors.
	stderrTail = 32 << 10
	// maxUnixSocketPath is sun_path's size minus its terminating NUL.
	maxUnixSocketPath = 107
)

// Start writes the daemon's config, starts it in its own process group (in
// the caller's mount namespace, see below) and waits until it answers with a
// worker.
func Start(ctx context.Context, cfg Config) (*Daemon, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 60 * time.Second
	}
	sock := filepath.Join(cfg.Dir, socketName)
	if len(sock) > maxUnixSocketPath {
		return nil, fmt.Errorf("buildkitd socket path %s is %d bytes, over the unix socket limit of %d; use a shorter state dir", sock, len(sock), maxUnixSocketPath)
	}
	tmp := filepath.Join(cfg.Dir, "tmp")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("create buildkitd temp dir: %w", err)
	}
	conf, err := renderConfig(cfg)
	if err != nil {
		return nil, err
	}
	confPath := filepath.Join(cfg.Dir, configName)
	if err := os.WriteFile(confPath, conf, 0o600); err != nil {
		return nil, fmt.Errorf("write buildkitd config: %w", err)
	}

	addr := "unix://" + sock
	d := &Daemon{
		cfg:    cfg,
		addr:   addr,
		stderr: tail.New(stderrTail),
		exited: make(chan struct{}),
	}
	cmd := exec.Command(cfg.Binary, "--config", confPath, "--addr", addr, "--root", cfg.Root)
	cmd.Stdout = d.stderr
	cmd.Stderr = d.stderr
	cmd.Env = append(os.Environ(),
		"TMPDIR="+tmp,
		// runc and mount helpers live in sbin, which service managers'
		// PATHs do not always carry.
		"PATH="+os.Getenv("PATH")+":/usr/local/sbin:/usr/sbin:/sbin",
	)
	penv, err := proxyEnv(cfg.Proxy, cfg.NoProxy)
	if err != nil {
		return nil, err
	}
	cmd.Env = append(cmd.Env, penv...)
	// No private mount namespace: one would hold a private copy of every
	// other build's volume mount for this daemon's whole life, keeping
	// their loop devices busy after they finish. buildkitd's own mounts
	// live below the build's mount point and are unmounted on release.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if cfg.StepMemoryBytes > 0 {
		// From here on Stop removes the cgroup.
		err := limitMemory(cfg.CgroupParent, cfg.StepMemoryBytes)
		switch {
		case errors.Is(err, errNoMemoryController):
			// Failing every build on such a host helps no one; say it.
			cfg.Logger.Warn("buildkitd: the build's memory limit is not enforced", "reason", err)
		case err != nil:
			return nil, errors.Join(err, KillCgroup(cfg.CgroupParent))
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, errors.Join(fmt.Errorf("start buildkitd %s: %w", cfg.Binary, err), killCgroupIfSet(cfg.CgroupParent))
	}
	d.cmd = cmd
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	if err := os.WriteFile(filepath.Join(cfg.Dir, pidFileName), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		d.Stop(context.Background())
		return nil, fmt.Errorf("write buildkitd pid file: %w", err)
	}

	if err := d.waitReady(ctx); err != nil {
		stopErr := d.Stop(context.Background())
		if tail := d.StderrTail(); tail != "" {
			err = fmt.Errorf("%w\nbuildkitd output:\n%s", err, tail)
		}
		return nil, errors.Join(err, stopErr)
	}
	return d, nil
}

func (d *Daemon) waitReady(parent context.Context) error {
	ctx, cancel := context.WithTimeout(parent, d.cfg.StartTimeout)
	defer cancel()
	// Dial only once the socket exists: a failed first dial puts gRPC into
	// its reconnect backoff, which alone cost builds 1-3 s per start.
	sock := strings.TrimPrefix(d.addr, "unix://")
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("buildkitd did not open its socket %s within %s: %w\n%s", sock, d.cfg.StartTimeout, ctx.Err(), d.StderrTail())
		case <-d.exited:
			return fmt.Errorf("buildkitd exited while starting: %v\n%s", d.waitErr, d.StderrTail())
		case <-time.After(10 * time.Millisecond):
		}
	}
	c, err := client.New(ctx, d.addr)
	if err != nil {
		return fmt.Errorf("connect to buildkitd at %s: %w", d.addr, err)
	}
	var lastErr error
	for {
		select {
		case <-d.exited:
			c.Close()
			return fmt.Errorf("buildkitd exited while starting: %v", d.waitErr)
		default:
		}
		attemptCtx, attemptCancel := context.WithTimeout(ctx, 2*time.Second)
		workers, err := c.ListWorkers(attemptCtx)
		attemptCancel()
		switch {
		case err == nil && len(workers) > 0:
			d.client = c
			return nil
		case err == nil:
			lastErr = errors.New("buildkitd has no worker; is runc installed and executable?")
		default:
			lastErr = err
		}
		select {
		case <-ctx.Done():
			c.Close()
			if parent.Err() != nil {
				return fmt.Errorf("waiting for buildkitd to start: %w", parent.Err())
			}
			return fmt.Errorf("buildkitd did not answer within %s: %v", d.cfg.StartTimeout, lastErr)
		case <-d.exited:
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// Client is connected to the daemon; Stop closes it.
func (d *Daemon) Client() *client.Client { return d.client }

// Addr is the daemon's gRPC address (unix://…).
func (d *Daemon) Addr() string { return d.addr }

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// StderrTail returns the last part of the daemon's output.
func (d *Daemon) StderrTail() string { return d.stderr.String() }

// stopGrace is how long buildkitd gets to shut down after SIGTERM.
const stopGrace = 5 * time.Second

// Stop terminates the daemon: SIGTERM, then SIGKILL to its whole process
// group after stopGrace (or at once when ctx ends), then kills any build step
// left in its cgroup. It waits until all of that is gone and is safe to call
// more than once.
func (d *Daemon) Stop(ctx context.Context) error {
	d.stopOnce.Do(func() { d.stopErr = d.stop(ctx) })
	return d.stopErr
}

func (d *Daemon) stop(ctx context.Context) error {
	if d.client != nil {
		d.client.Close()
	}
	pid := d.cmd.Process.Pid
	_ = syscall.Kill(pid, syscall.SIGTERM)
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	select {
	case <-d.exited:
	case <-timer.C:
		d.cfg.Logger.Warn("buildkitd ignored SIGTERM; killing it", "pid", pid, "grace", stopGrace)
	case <-ctx.Done():
	}
	// The group also holds helpers buildkitd spawned; they must not outlive
	// it. ESRCH just means nothing was left.
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("buildkitd (pid %d) did not exit after SIGKILL", pid)
	}
	var errs []error
	if d.cfg.CgroupParent != "" {
		if err := KillCgroup(d.cfg.CgroupParent); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(filepath.Join(d.cfg.Dir, pidFileName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// proxyEnv is the daemon's proxy environment: every proxy variable set to
// proxy, NO_PROXY to loopback and the noProxy hosts. None without a proxy.
func proxyEnv(proxy string, noProxy []string) ([]string, error) {
	if proxy == "" {
		if len(noProxy) > 0 {
			return nil, fmt.Errorf("buildkitd: no-proxy hosts %v without a proxy", noProxy)
		}
		return nil, nil
	}
	skip := []string{"localhost", "127.0.0.1", "::1"}
	for _, h := range noProxy {
		if h == "" || strings.ContainsAny(h, ",/ \t\r\n") {
			return nil, fmt.Errorf("buildkitd: no-proxy host %q must be a bare host name", h)
		}
		skip = append(skip, h)
	}
	list := strings.Join(skip, ",")
	var env []string
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"} {
		env = append(env, k+"="+proxy)
	}
	return append(env, "NO_PROXY="+list, "no_proxy="+list), nil
}

func killCgroupIfSet(name string) error {
	if name == "" {
		return nil
	}
	return KillCgroup(name)
}

// Exited is closed once the daemon process is gone.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// buildkitdConfig mirrors the subset of buildkitd.toml kiln sets. Sizes are
// strings because BuildKit parses "18GB" and "10%" itself.
type buildkitdConfig struct {
	Root string `toml:"root"`
	OTEL struct {
		SocketPath string `toml:"socketPath"`
	} `toml:"otel"`
	Worker struct {
		OCI struct {
			Enabled             bool   `toml:"enabled"`
			Snapshotter         string `toml:"snapshotter"`
			Binary              string `toml:"binary"`
			NetworkMode         string `toml:"networkMode"`
			GC                  bool   `toml:"gc"`
			ReservedSpace       string `toml:"reservedSpace,omitempty"`
			MaxUsedSpace        string `toml:"maxUsedSpace,omitempty"`
			MinFreeSpace        string `toml:"minFreeSpace,omitempty"`
			DefaultCgroupParent string `toml:"defaultCgroupParent,omitempty"`
			MaxParallelism      int    `toml:"max-parallelism,omitempty"`
		} `toml:"oci"`
		Containerd struct {
			Enabled bool `toml:"enabled"`
		} `toml:"containerd"`
	} `toml:"worker"`
	Registry     map[string]registryConfig `toml:"registry,omitempty"`
	History      *historyConfig            `toml:"history,omitempty"`
	Entitlements []string                  `toml:"insecure-entitlements,omitempty"`
}

// historyConfig with MaxEntries 0 disables recording history at all (not
// just its retention) in BuildKit v0.34.
type historyConfig struct {
	MaxEntries int64 `toml:"maxEntries"`
}

type registryConfig struct {
	HTTP     bool `toml:"http"`
	Insecure bool `toml:"insecure"`
}

func renderConfig(cfg Config) ([]byte, error) {
	var c buildkitdConfig
	c.Root = cfg.Root
	// Each daemon needs its own trace socket; the default path is shared
	// by every buildkitd on the host.
	c.OTEL.SocketPath = filepath.Join(cfg.Dir, "otel.sock")
	oci := &c.Worker.OCI
	oci.Enabled = true
	oci.Snapshotter = "overlayfs"
	oci.Binary = cfg.Runc
	oci.NetworkMode = "host"
	for _, e := range cfg.Entitlements {
		if e != "network.host" && e != "security.insecure" {
			return nil, fmt.Errorf("entitlement %q is not network.host or security.insecure", e)
		}
	}
	c.Entitlements = cfg.Entitlements
	oci.GC = true
	for _, f := range []struct {
		name, value string
		dst         *string
	}{
		{"reserved space", cfg.GC.ReservedSpace, &oci.ReservedSpace},
		{"max used space", cfg.GC.MaxUsedSpace, &oci.MaxUsedSpace},
		{"min free space", cfg.GC.MinFreeSpace, &oci.MinFreeSpace},
	} {
		v := strings.TrimSpace(f.value)
		if v == "" {
			continue
		}
		if err := validateDiskSpace(v); err != nil {
			return nil, fmt.Errorf("GC %s %q: %w", f.name, f.value, err)
		}
		*f.dst = v
	}
	oci.DefaultCgroupParent = cfg.CgroupParent
	oci.MaxParallelism = cfg.MaxParallelism
	c.Worker.Containerd.Enabled = false
	if len(cfg.InsecureRegistries) > 0 {
		c.Registry = map[string]registryConfig{}
		for _, h := range cfg.InsecureRegistries {
			if h == "" || strings.ContainsAny(h, "/ ") {
				return nil, fmt.Errorf("insecure registry %q must be a bare host[:port]", h)
			}
			c.Registry[h] = registryConfig{HTTP: true, Insecure: true}
		}
	}
	if cfg.NoHistory {
		c.History = &historyConfig{MaxEntries: 0}
	}
	out, err := toml.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("render buildkitd config: %w", err)
	}
	return out, nil
}

// validateDiskSpace accepts what BuildKit's DiskSpace accepts: a percentage
// of the filesystem ("10%") or a size ("18GB", "2GiB", bare bytes).
func validateDiskSpace(v string) error {
	if p, ok := strings.CutSuffix(v, "%"); ok {
		n, err := strconv.ParseInt(p, 10, 64)
		if err != nil || n < 0 || n > 100 {
			return errors.New("percentage must be an integer between 0 and 100")
		}
		return nil
	}
	if _, err := units.RAMInBytes(v); err != nil {
		return errors.New(`want a size such as "18GB", "2GiB" or a percentage such as "10%"`)
	}
	return nil
}
