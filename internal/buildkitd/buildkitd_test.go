package buildkitd

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bkconfig "github.com/moby/buildkit/cmd/buildkitd/config"
	"golang.org/x/net/http/httpproxy"

	"github.com/kiln-build/kiln/internal/testkit"
)

func TestStartFailureReportsBuildkitdOutput(t *testing.T) {
	dir := t.TempDir()
	notADir := filepath.Join(dir, "root-file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Start(context.Background(), Config{
		Binary:       testkit.Buildkitd(t),
		Root:         notADir,
		Dir:          dir,
		Runc:         "/usr/sbin/runc",
		StartTimeout: 20 * time.Second,
	})
	if err == nil {
		t.Fatal("buildkitd started with a file as its root")
	}
	if !strings.Contains(err.Error(), "buildkitd output:") || !strings.Contains(err.Error(), "root-file") {
		t.Errorf("error lacks buildkitd's own explanation: %v", err)
	}
}

func TestRenderedConfigMeansWhatWeIntend(t *testing.T) {
	out, err := renderConfig(Config{
		Root:               "/vol",
		Dir:                "/state/b1",
		Runc:               "/usr/sbin/runc",
		GC:                 GCPolicy{ReservedSpace: "2GiB", MaxUsedSpace: "18GB", MinFreeSpace: "10%"},
		InsecureRegistries: []string{"127.0.0.1:5000", "kiln.internal:8443"},
		CgroupParent:       "kiln-x-b1",
		MaxParallelism:     2,
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := bkconfig.Load(strings.NewReader(string(out)))
	if err != nil {
		t.Fatalf("buildkitd cannot parse our config: %v\n%s", err, out)
	}
	oci := cfg.Workers.OCI
	if cfg.Root != "/vol" || oci.Snapshotter != "overlayfs" || oci.Binary != "/usr/sbin/runc" || oci.Mode != "host" {
		t.Errorf("root/worker settings lost: %+v", cfg)
	}
	if oci.Enabled == nil || !*oci.Enabled || cfg.Workers.Containerd.Enabled == nil || *cfg.Workers.Containerd.Enabled {
		t.Errorf("want oci worker on and containerd worker off")
	}
	if oci.GC == nil || !*oci.GC || oci.GCReservedSpace.Bytes != 2<<30 || oci.GCMaxUsedSpace.Bytes != 18<<30 || oci.GCMinFreeSpace.Percentage != 10 {
		t.Errorf("GC settings parsed as gc=%v reserved=%+v max=%+v minfree=%+v", oci.GC, oci.GCReservedSpace, oci.GCMaxUsedSpace, oci.GCMinFreeSpace)
	}
	if oci.DefaultCgroupParent != "kiln-x-b1" || oci.MaxParallelism != 2 {
		t.Errorf("cgroup parent / parallelism lost")
	}
	for _, h := range []string{"127.0.0.1:5000", "kiln.internal:8443"} {
		rc, ok := cfg.Registries[h]
		if !ok || rc.PlainHTTP == nil || !*rc.PlainHTTP || rc.Insecure == nil || !*rc.Insecure {
			t.Errorf("registry %s not configured for plain HTTP: %+v", h, rc)
		}
	}
	if cfg.OTEL.SocketPath != "/state/b1/otel.sock" {
		t.Errorf("otel socket %q is shared with other daemons", cfg.OTEL.SocketPath)
	}

	if cfg.History != nil {
		t.Errorf("history settings appeared without NoHistory: %+v", cfg.History)
	}
	out, err = renderConfig(Config{Root: "/vol", Dir: "/d", NoHistory: true})
	if err != nil {
		t.Fatal(err)
	}
	if cfg, err = bkconfig.Load(strings.NewReader(string(out))); err != nil {
		t.Fatal(err)
	}
	if cfg.History == nil || cfg.History.MaxEntries == nil || *cfg.History.MaxEntries != 0 {
		t.Errorf("NoHistory did not set history.maxEntries = 0:\n%s", out)
	}

	if _, err := renderConfig(Config{GC: GCPolicy{MaxUsedSpace: "lots"}}); err == nil || !strings.Contains(err.Error(), "max used space") {
		t.Errorf("bad GC size: err = %v", err)
	}
}

// TestStopAndKillLeftoverLeaveNoDaemon covers both ways a daemon ends: a
// normal Stop, and KillLeftover finding one that a crashed parent left
// behind by its pid file.
func TestStopAndKillLeftoverLeaveNoDaemon(t *testing.T) {
	dir, err := os.MkdirTemp("", "kbk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	start := func(name string) *Daemon {
		t.Helper()
		state := filepath.Join(dir, name)
		if err := os.MkdirAll(state, 0o700); err != nil {
			t.Fatal(err)
		}
		d, err := Start(context.Background(), Config{
			Binary:       testkit.Buildkitd(t),
			Root:         filepath.Join(dir, name+"-root"),
			Dir:          state,
			Runc:         "/usr/sbin/runc",
			CgroupParent: "kiln-bk-test-" + name,
			StartTimeout: time.Minute,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Stop(context.Background()) })
		return d
	}

	d := start("stop")
	if _, err := d.Client().ListWorkers(context.Background()); err != nil {
		t.Fatalf("started daemon does not answer: %v", err)
	}
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "stop", pidFileName)); !os.IsNotExist(err) {
		t.Errorf("Stop left the pid file behind: %v", err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(d.Pid())); err == nil {
		t.Errorf("buildkitd pid %d still exists after Stop", d.Pid())
	}

	leftover := start("leftover")
	if err := KillLeftover(filepath.Join(dir, "leftover")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-leftover.Exited():
	case <-time.After(10 * time.Second):
		t.Fatalf("KillLeftover left pid %d running", leftover.Pid())
	}
	// A dir whose pid file names a process that is not its buildkitd must
	// not get that process killed.
	if err := os.WriteFile(filepath.Join(dir, "stop", pidFileName), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := KillLeftover(filepath.Join(dir, "stop")); err != nil {
		t.Fatalf("KillLeftover with a recycled pid: %v", err)
	}
}

// TestProxyEnvKeepsTunnelledRegistriesDirect: with a proxy, the daemon's
// environment sends everything through it except loopback and the
// NoProxy hosts, on any port and scheme, as Go's proxy selection (which
// BuildKit's registry client uses) reads that environment.
func TestProxyEnvKeepsTunnelledRegistriesDirect(t *testing.T) {
	const proxy = "http://127.0.0.1:3128"
	env, err := proxyEnv(proxy, []string{"kiln.example.com", "ghcr.io", "plain.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"} {
		if vars[k] != proxy {
			t.Errorf("%s = %q, want %q", k, vars[k], proxy)
		}
	}
	if vars["NO_PROXY"] != vars["no_proxy"] {
		t.Errorf("NO_PROXY %q and no_proxy %q differ", vars["NO_PROXY"], vars["no_proxy"])
	}
	pick := (&httpproxy.Config{HTTPProxy: vars["HTTP_PROXY"], HTTPSProxy: vars["HTTPS_PROXY"], NoProxy: vars["NO_PROXY"]}).ProxyFunc()
	for raw, direct := range map[string]bool{
		// Registries the guest reaches through tunnels of their own.
		"https://kiln.example.com:7070/v2/":       true,
		"http://kiln.example.com:7070/token":      true,
		"https://ghcr.io/v2/acme/app/manifests/1": true,
		"https://GHCR.io/v2/":                     true,
		"https://plain.example.com/v2/":           true, // the HTTPS probe of an insecure one
		"http://plain.example.com/v2/":            true,
		"https://127.0.0.1:5999/v2/":              true,
		"http://localhost:5999/v2/":               true,
		"https://[::1]:5999/v2/":                  true,
		"https://auth.docker.io/token":            false,
		"https://example.org/file.tar.gz":         false,
		"http://example.org/file.tar.gz":          false,
		"https://kiln.example.com.evil.org/":      false,
		"https://registry-1.docker.io/v2/":        false,
		"https://127.0.1.1.nip.io/":               false,
		"https://notghcr.io/v2/":                  false,
	} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		p, err := pick(u)
		if err != nil {
			t.Fatal(err)
		}
		if got := p == nil; got != direct {
			t.Errorf("%s: direct = %t, want %t (proxy %v)", raw, got, direct, p)
		}
	}

	if env, err := proxyEnv("", nil); err != nil || len(env) != 0 {
		t.Errorf("no proxy: env %v, err %v; want nothing", env, err)
	}
	for _, bad := range [][]string{{""}, {"a.example.com,b.example.com"}, {"a b"}, {"http://a.example.com"}} {
		if _, err := proxyEnv(proxy, bad); err == nil {
			t.Errorf("no-proxy hosts %q were taken", bad)
		}
	}
	if _, err := proxyEnv("", []string{"kiln.example.com"}); err == nil {
		t.Error("no-proxy hosts without a proxy were taken")
	}
}
