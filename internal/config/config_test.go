package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

var update = flag.Bool("update", false, "rewrite docs/configuration.md")

func TestConfigurationDocIsCurrent(t *testing.T) {
	path := filepath.Join("..", "..", "docs", "configuration.md")
	if *update {
		if err := os.WriteFile(path, []byte(Markdown()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != Markdown() {
		t.Fatalf("docs/configuration.md is out of date: run make generate")
	}
}

func load(t *testing.T, file string, env map[string]string, args ...string) (Config, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	var c Config
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	c.Bind(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if file != "" {
		p := filepath.Join(t.TempDir(), "kiln.yaml")
		os.WriteFile(p, []byte(file), 0o644)
		c.ConfigFile = p
	}
	return c, c.Load(fs)
}

func TestPrecedenceFlagEnvFileDefault(t *testing.T) {
	c, err := load(t, "listen: 1.2.3.4:1\nmax_concurrent_builds: 3\ncache:\n  volume_size: 1GiB\n",
		map[string]string{"KILN_MAX_CONCURRENT_BUILDS": "5", "KILN_LIMITS_CPUS_MAX": "4"}, "--max-concurrent-builds", "7")
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxConcurrent != 7 {
		t.Errorf("flag should win: %d", c.MaxConcurrent)
	}
	if c.Listen != "1.2.3.4:1" || c.CacheVolumeSize != 1<<30 {
		t.Errorf("file values not applied: %q %d", c.Listen, c.CacheVolumeSize)
	}
	if c.CPUsMax != 4 {
		t.Errorf("env not applied: %d", c.CPUsMax)
	}
	if c.DataDir != "./kiln-data" || c.TimeoutSecDefault != 3600 {
		t.Errorf("defaults not applied: %q %d", c.DataDir, c.TimeoutSecDefault)
	}
}

func TestBadConfigSaysWhatAndWhere(t *testing.T) {
	for _, tc := range []struct {
		file string
		env  map[string]string
		want string
	}{
		{"colour: red\n", nil, "unknown keys colour"},
		{"", map[string]string{"KILN_CACHE_VOLUME_SIZE": "lots"}, "KILN_CACHE_VOLUME_SIZE"},
		{"max_concurrent_builds: many\n", nil, "config file"},
		{"runtime: docker\n", nil, "runtime"},
		{"", map[string]string{"KILN_VM_UNRESPONSIVE": "1s"}, "vm.unresponsive"},
		{"limits:\n  cpus:\n    default: 8\n    max: 2\n", nil, "limits.cpus.default"},
		{": : :\n", nil, "not valid YAML"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			_, err := load(t, tc.file, tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("config %q env %v: error %v, want mention of %q", tc.file, tc.env, err, tc.want)
			}
		})
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"1024": 1024, "1KiB": 1024, "20GiB": 20 << 30, "512MB": 512 << 20, "0": 0} {
		if got, err := ParseBytes(in); err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"-1", "lots", ""} {
		if _, err := ParseBytes(bad); err == nil {
			t.Errorf("ParseBytes(%q) accepted", bad)
		}
	}
}

func TestMirrorSettingsFromFileAndEnv(t *testing.T) {
	c, err := load(t, "mirror:\n  credentials:\n    ghcr.io:\n      username: u\n      password: p\n  insecure: [reg.local:5000, other:1]\n",
		map[string]string{"KILN_MIRROR_ENDPOINTS": `{"docker.io":"http://127.0.0.1:5000"}`})
	if err != nil {
		t.Fatal(err)
	}
	if c.MirrorCredentials["ghcr.io"]["password"] != "p" || len(c.MirrorInsecure) != 2 || c.MirrorEndpoints["docker.io"] != "http://127.0.0.1:5000" {
		t.Errorf("mirror settings: %+v %v %v", c.MirrorCredentials, c.MirrorInsecure, c.MirrorEndpoints)
	}
	_, err = load(t, "", map[string]string{"KILN_MIRROR_CREDENTIALS": `{"ghcr.io":"s3cret"}`})
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("bad credentials: error %v must exist and not echo the value", err)
	}
}

func TestCapsAreCheckedAgainstTheHost(t *testing.T) {
	c, err := load(t, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	host := Host{CPUs: 2, MemoryMB: 4096, DiskBytes: 200 << 30, FreeBytes: 50 << 30}
	c.CPUsMax, c.MemoryMBMax, c.DiskGBMax = 2, 4096, 100
	warn, err := c.CheckHost(host)
	if err != nil || len(warn) != 1 || !strings.Contains(warn[0], "free") {
		t.Errorf("caps within the host: err %v warnings %v", err, warn)
	}
	for name, mutate := range map[string]func(*Config){
		"limits.cpus.max":      func(c *Config) { c.CPUsMax = 3 },
		"limits.memory_mb.max": func(c *Config) { c.MemoryMBMax = 8192 },
		"limits.disk_gb.max":   func(c *Config) { c.DiskGBMax = 300 },
	} {
		cc := c
		mutate(&cc)
		if _, err := cc.CheckHost(host); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s over the host: error %v", name, err)
		}
	}
	real, err := ReadHost(t.TempDir())
	if err != nil || real.CPUs < 1 || real.MemoryMB < 1 || real.DiskBytes <= 0 {
		t.Errorf("ReadHost: %+v %v", real, err)
	}
}
