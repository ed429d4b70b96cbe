// Package config defines every kiln server setting once: its config-file
// key, the environment variable and command-line flag derived from that
// key, its default and its help. Precedence: flag, then environment, then
// config file, then default.
package config

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-units"
	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"
)

// Config is the server's configuration.
type Config struct {
	ConfigFile string
	DataDir    string
	Database   string // records and queue: "" or a file for SQLite (relative to DataDir), or a postgres:// URL; may hold a password: never log it
	Listen     string
	Runtime    string
	// BuilderImage is the builder VM image directory; empty means
	// <data>/builder.
	BuilderImage string
	LogLevel     string
	// RegistryHost is how builders reach kiln's registry; empty means the
	// listen address.
	RegistryHost string
	// RegistryStorage is the registry's storage driver: filesystem (under
	// the data directory) or s3 (the RegistryS3* settings).
	RegistryStorage          string
	RegistryS3Bucket         string
	RegistryS3Region         string
	RegistryS3RegionEndpoint string
	RegistryS3ForcePathStyle bool
	registryS3PathStyle      string // as given; validate parses it into RegistryS3ForcePathStyle
	// RegistryS3AccessKey and RegistryS3SecretKey are static S3
	// credentials (memory only; never logged); empty means the AWS
	// environment's.
	RegistryS3AccessKey string
	RegistryS3SecretKey string
	RegistryS3RootDir   string
	RegistryS3Redirect  string

	MaxConcurrent int

	ContextMaxBytes             int64
	ContextMaxUncompressedBytes int64
	ContextMaxEntries           int

	CPUsDefault, CPUsMax             int
	MemoryMBDefault, MemoryMBMax     int
	DiskGBDefault, DiskGBMax         int
	TimeoutSecDefault, TimeoutSecMax int

	CacheVolumeSize   int64
	CacheMaxTotal     int64
	CacheMaxVolumes   int
	GCReservedPercent int
	GCMaxUsedPercent  int

	ShutdownGrace time.Duration
	// VMUnresponsive is how long a builder VM may leave pings unanswered
	// before it counts as frozen and is replaced.
	VMUnresponsive time.Duration

	DedupTTL time.Duration
	// DedupTrustGroups names groups of tenants whose identical builds
	// may answer each other's.
	DedupTrustGroups map[string][]string

	// TenancyShared are the namespaces every tenant pulls and only
	// admins write.
	TenancyShared []string
	// TokensMaxTTL bounds the lifetime of tokens issued through the API.
	TokensMaxTTL time.Duration

	// BuildersIdleTimeout keeps a scope's builder up between its builds (0:
	// one builder per build); BuildersMaxWarm caps builders kept up (0:
	// what host memory allows, see MaxWarm).
	BuildersIdleTimeout time.Duration
	BuildersMaxWarm     int

	// ContextStorePerTenant and ContextStoreTotal bound the content store
	// that manifest uploads are materialized from.
	ContextStorePerTenant, ContextStoreTotal int64

	// UploadsMax and UploadsPerTenant bound concurrent build submissions.
	UploadsMax, UploadsPerTenant int
	// HTTPIdleTimeout closes idle keep-alive connections;
	// HTTPMinUploadRate fails request bodies slower than this many bytes
	// per second over 30 s.
	HTTPIdleTimeout   time.Duration
	HTTPMinUploadRate int64

	// MirrorCredentials maps an upstream registry host to credentials
	// ({"ghcr.io": {"username": "u", "password": "token"}}); memory only.
	MirrorCredentials map[string]map[string]string
	MirrorInsecure    []string
	MirrorEndpoints   map[string]string

	NetworkDefault string
	NetworkAllowed []string
	// RegistriesAllowed are the registries other than kiln's builds may
	// push to and use as caches; RegistriesInsecure those reached over
	// plain HTTP (loopback ones always are).
	RegistriesAllowed  []string
	RegistriesInsecure []string
	// BuildsEntitlements are the insecure entitlements builds may ask
	// for with --allow.
	BuildsEntitlements []string
	// AttestSBOMGenerator is the SBOM scanner image of builds that ask
	// for an SBOM without naming one; pinned through the mirror like a
	// base image.
	AttestSBOMGenerator string
	// ContextURLAllowed are the hosts kiln downloads http(s) contexts
	// from.
	ContextURLAllowed []string
	// SSEHeartbeat is how often an idle event stream sends a comment.
	SSEHeartbeat time.Duration
	// BuildsClientGoneAfter cancels an attached build (one submitted with
	// attach=true, as kiln build does without --detach) that has had no
	// event stream open for this long; 0 disables.
	BuildsClientGoneAfter time.Duration
	// BuildsSSHSessionWait bounds how long a build that forwards its
	// client's ssh agent waits for the client's ssh session.
	BuildsSSHSessionWait time.Duration
}

type kind int

const (
	kString kind = iota
	kInt
	kBytes
	kDuration
	kList   // comma-separated in env and flags, a YAML list in the file
	kObject // JSON in env and flags, a YAML mapping in the file
)

// setting is one knob.
type setting struct {
	key  string // config-file key, dotted for nesting
	def  string
	help string
	kind kind
	ptr  any
}

// Env is the environment variable of a key: KILN_ + upper-cased key with
// dots and dashes as underscores.
func Env(key string) string {
	return "KILN_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(key))
}

// Flag is the command-line flag of a key: dots become dashes.
func Flag(key string) string { return strings.ReplaceAll(strings.ReplaceAll(key, "_", "-"), ".", "-") }

func (c *Config) settings() []setting {
	return []setting{
		{"data", "./kiln-data", "data directory: database, registry storage, cache volumes, keys", kString, &c.DataDir},
		{"database", "", "where records and the build queue live: empty for SQLite at <data>/kiln.db, a SQLite file path (relative to the data directory), or postgres://user@host:5432/dbname?sslmode=... for PostgreSQL (see docs/deploy.md). Put a password in the config file, env or PGPASSWORD/~/.pgpass rather than the flag: flags show in ps; kiln logs only host and database name", kString, &c.Database},
		{"listen", "127.0.0.1:7070", "address the API and registry listen on", kString, &c.Listen},
		{"runtime", "auto", "builder runtime: process (buildkitd on the host), vm (one microVM per build), or auto (vm when a builder image exists and QEMU runs, else process)", kString, &c.Runtime},
		{"builder_image", "", "directory of the builder VM image the vm runtime boots (default: <data>/builder; make it with kiln builder-image build)", kString, &c.BuilderImage},
		{"vm.unresponsive", "60s", "how long a builder VM may leave the host's pings unanswered before it counts as frozen: it is killed and the build runs again in a new VM, once", kDuration, &c.VMUnresponsive},
		{"log_level", "info", "log level: debug, info, warn, error", kString, &c.LogLevel},
		{"registry_host", "", "host:port builders use to reach kiln's registry (default: the listen address)", kString, &c.RegistryHost},
		{"registry.storage", "filesystem", "where the registry keeps images: filesystem (<data>/registry) or s3 (the registry.s3.* settings; see docs/deploy.md)", kString, &c.RegistryStorage},
		{"registry.s3.bucket", "", "S3 bucket the registry keeps images in (it must exist)", kString, &c.RegistryS3Bucket},
		{"registry.s3.region", "", "the bucket's region, e.g. eu-west-1 (may stay empty with registry.s3.regionendpoint)", kString, &c.RegistryS3Region},
		{"registry.s3.regionendpoint", "", "URL of an S3-compatible server, e.g. http://minio:9000 (empty: AWS)", kString, &c.RegistryS3RegionEndpoint},
		{"registry.s3.forcepathstyle", "false", "address the bucket as <endpoint>/<bucket> rather than <bucket>.<endpoint>; most S3-compatible servers need true", kString, &c.registryS3PathStyle},
		{"registry.s3.accesskey", "", "S3 access key id (empty: the AWS environment, ~/.aws/credentials or the instance role)", kString, &c.RegistryS3AccessKey},
		{"registry.s3.secretkey", "", "S3 secret access key, with registry.s3.accesskey (prefer the config file or env over the flag: flags show in ps)", kString, &c.RegistryS3SecretKey},
		{"registry.s3.rootdirectory", "", "key prefix the registry keeps everything under in the bucket (empty: the bucket's root)", kString, &c.RegistryS3RootDir},
		{"registry.s3.redirect", "disable", "disable: kiln serves every blob itself; presigned: clients other than builds are redirected to presigned S3 URLs for blob downloads and must reach the S3 endpoint themselves; or an https://host URL naming the store's public endpoint for those redirects", kString, &c.RegistryS3Redirect},
		{"max_concurrent_builds", "2", "builds running at once across all cache scopes", kInt, &c.MaxConcurrent},
		{"context.max_bytes", "2GiB", "largest build context upload (as sent, possibly compressed)", kBytes, &c.ContextMaxBytes},
		{"context.max_uncompressed_bytes", "8GiB", "largest build context once uncompressed", kBytes, &c.ContextMaxUncompressedBytes},
		{"context.url_allowed", "*", "hosts the server downloads http(s) build contexts from (kiln build https://host/ctx.tar.gz, --build-context NAME=https://...): host, host:port or *.domain, comma-separated; * for any public host (hosts on the server's own networks — localhost, loopback, private IPs — only when listed by host:port, and a host matched by a wildcard is fetched from only if it resolves to public addresses, git hosts too); empty for none", kList, &c.ContextURLAllowed},
		{"context.max_entries", "1000000", "most files, directories and links in one build context", kInt, &c.ContextMaxEntries},
		{"limits.cpus.default", "2", "CPUs a build gets when it asks for none", kInt, &c.CPUsDefault},
		{"limits.cpus.max", "2", "most CPUs a build may ask for", kInt, &c.CPUsMax},
		{"limits.memory_mb.default", "2048", "memory (MiB) a build gets when it asks for none", kInt, &c.MemoryMBDefault},
		{"limits.memory_mb.max", "8192", "most memory (MiB) a build may ask for", kInt, &c.MemoryMBMax},
		{"limits.disk_gb.default", "20", "scratch volume size (GiB) for builds without a warm cache", kInt, &c.DiskGBDefault},
		{"limits.disk_gb.max", "50", "largest scratch volume (GiB) a build may ask for", kInt, &c.DiskGBMax},
		{"limits.timeout_seconds.default", "3600", "build timeout (s) when a build asks for none", kInt, &c.TimeoutSecDefault},
		{"limits.timeout_seconds.max", "21600", "longest timeout (s) a build may ask for", kInt, &c.TimeoutSecMax},
		{"cache.volume_size", "20GiB", "size of each cache scope's ext4 volume (sparse: only used blocks take host disk)", kBytes, &c.CacheVolumeSize},
		{"cache.max_total_bytes", "0", "host bytes all cache volumes may take before the least recently used idle ones are evicted (0: no limit)", kBytes, &c.CacheMaxTotal},
		{"cache.max_volumes", "0", "most cache volumes kept before the least recently used idle ones are evicted (0: no limit)", kInt, &c.CacheMaxVolumes},
		{"cache.gc_reserved_percent", "10", "share of a cache volume BuildKit's GC always keeps", kInt, &c.GCReservedPercent},
		{"cache.gc_max_used_percent", "80", "share of a cache volume above which BuildKit's GC frees space", kInt, &c.GCMaxUsedPercent},
		{"sse_heartbeat", "15s", "how often an idle build event stream sends a heartbeat comment (keep it under your proxies' idle timeout)", kDuration, &c.SSEHeartbeat},
		{"builds.client_gone_after", "60s", "an attached build (submitted with attach=true, as kiln build does unless --detach) is canceled when no event stream has been open for it this long while it is queued or running: its client went away (0s: never; builds then outlive their client)", kDuration, &c.BuildsClientGoneAfter},
		{"builds.ssh_session_wait", "60s", "how long a build that forwards its client's ssh agent (kiln build --ssh) waits, before it runs, for the client to open the build's ssh session; then it fails saying so", kDuration, &c.BuildsSSHSessionWait},
		{"builds.entitlements", "", "insecure entitlements builds may ask for with kiln build --allow: network.host (RUN --network=host), security.insecure (RUN --security=insecure: privileged steps; on the process runtime, root on this host), comma-separated; builds asking for others are refused (403)", kList, &c.BuildsEntitlements},
		{"attest.sbom_generator", "docker/buildkit-syft-scanner", "SBOM scanner image of builds that ask for an SBOM (kiln build --sbom=true) without naming one; pinned to a digest at submission and pulled through kiln's base-image mirror (or from kiln's registry, when it names it)", kString, &c.AttestSBOMGenerator},
		{"dedup.ttl", "24h", "how long a succeeded build answers identical submissions without building (0s: never)", kDuration, &c.DedupTTL},
		{"dedup.trust_groups", "{}", "groups of tenants whose identical builds may answer each other's, e.g. {\"web\":[\"team-a\",\"team-b\"]}; otherwise dedup stays within a tenant, and builds using cache mounts always do", kObject, &c.DedupTrustGroups},
		{"tenancy.shared", "base", "namespaces every tenant may pull from and only build:admin tokens write (e.g. base for base/busybox), comma-separated", kList, &c.TenancyShared},
		{"tokens.max_ttl", "2160h", "longest lifetime of a token created through the API (the admin token written at first start is exempt; revoke it with kiln token revoke)", kDuration, &c.TokensMaxTTL},
		{"builders.idle_timeout", "5m", "how long a cache scope's builder (buildkitd, or the builder VM) stays up after a build, so the scope's next build starts on it with no boot; reuse never crosses scopes (0s: a fresh builder for every build)", kDuration, &c.BuildersIdleTimeout},
		{"builders.max_warm", "0", "most builders kept up at once; past it the least recently used idle one is stopped (0: what host memory allows at limits.memory_mb.default, keeping 4 GiB free)", kInt, &c.BuildersMaxWarm},
		{"context_store.max_bytes_per_tenant", "4GiB", "content of recent build contexts kept per tenant, so kiln build sends only changed files; least recently used content goes first (0: no limit)", kBytes, &c.ContextStorePerTenant},
		{"context_store.max_total_bytes", "20GiB", "content of recent build contexts kept for all tenants together (0: no limit)", kBytes, &c.ContextStoreTotal},
		{"uploads.max_concurrent", "16", "build submissions (context uploads) in flight at once; more are answered 429 with Retry-After (0: no limit)", kInt, &c.UploadsMax},
		{"uploads.max_per_tenant", "4", "build submissions in flight at once per tenant (0: no limit)", kInt, &c.UploadsPerTenant},
		{"http.idle_timeout", "2m", "how long an idle keep-alive connection stays open", kDuration, &c.HTTPIdleTimeout},
		{"http.min_upload_rate", "1KiB", "slowest a request body may arrive, per second averaged over 30 s windows; slower uploads are cut off (0: any speed)", kBytes, &c.HTTPMinUploadRate},
		{"mirror.credentials", "{}", "credentials per upstream registry host for base images, e.g. {\"ghcr.io\":{\"username\":\"u\",\"password\":\"token\"}} (prefer the config file or env over the flag: flags show in ps)", kObject, &c.MirrorCredentials},
		{"mirror.insecure", "", "upstream registry hosts reached over plain HTTP (loopback always is), comma-separated", kList, &c.MirrorInsecure},
		{"mirror.endpoints", "{}", "upstream host → URL contacted instead, e.g. {\"docker.io\":\"https://dockerhub-cache.internal\"}", kObject, &c.MirrorEndpoints},
		{"network.default", "egress", "network mode of builds that ask for none: egress or isolated", kString, &c.NetworkDefault},
		{"network.allowed", "egress,isolated", "network modes builds may ask for (others get 403), comma-separated", kList, &c.NetworkAllowed},
		{"registries.allowed", "*", "registries other than kiln's that builds may push to (kiln build --push), import or export caches from (--cache-from/--cache-to) and name in docker-image:// contexts, with the submitter's credentials: host, host:port or *.domain, comma-separated; * for any public host (hosts on the server's own networks — localhost, loopback, private IPs — only when listed by host:port; with the vm runtime a registry matched by a wildcard is dialed at public addresses only); empty for none", kList, &c.RegistriesAllowed},
		{"registries.insecure", "", "registries other than kiln's that builders reach over plain HTTP (loopback ones always are), comma-separated host:port", kList, &c.RegistriesInsecure},
		{"shutdown_grace", "30s", "how long shutdown waits for running builds to stop", kDuration, &c.ShutdownGrace},
	}
}

// removed names settings kiln used to have, and what replaced them.
var removed = map[string]string{
	"dedup.across_scopes": "dedup now stays within a tenant (all its cache scopes); to let tenants that trust each other share results, list them in dedup.trust_groups",
}

// Bind registers a flag for every setting on fs.
func (c *Config) Bind(fs *pflag.FlagSet) {
	fs.StringVar(&c.ConfigFile, "config", os.Getenv("KILN_CONFIG"), "YAML config file (env KILN_CONFIG); keys as in docs/configuration.md")
	for _, s := range c.settings() {
		fs.String(Flag(s.key), "", fmt.Sprintf("%s (env %s, config %s, default %q)", s.help, Env(s.key), s.key, s.def))
	}
}

// Load resolves every setting from fs, the environment, the config file
// and the defaults, and validates the result.
func (c *Config) Load(fs *pflag.FlagSet) error {
	file := map[string]string{}
	if c.ConfigFile != "" {
		var err error
		if file, err = readFile(c.ConfigFile); err != nil {
			return err
		}
	}
	known := map[string]bool{}
	for _, s := range c.settings() {
		known[s.key] = true
		val, from := s.def, "default"
		if v, ok := file[s.key]; ok {
			val, from = v, "config file "+c.ConfigFile
		}
		if v, ok := os.LookupEnv(Env(s.key)); ok {
			val, from = v, "environment "+Env(s.key)
		}
		if fs != nil {
			if f := fs.Lookup(Flag(s.key)); f != nil && f.Changed {
				val, from = f.Value.String(), "flag --"+Flag(s.key)
			}
		}
		if err := s.set(val); err != nil {
			return fmt.Errorf("setting %s from %s: %w", s.key, from, err)
		}
	}
	var unknown []string
	for k := range file {
		if why, ok := removed[k]; ok {
			return fmt.Errorf("config file %s sets %s, which kiln no longer has: %s", c.ConfigFile, k, why)
		}
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return fmt.Errorf("config file %s has unknown keys %s; see docs/configuration.md for the valid ones", c.ConfigFile, strings.Join(unknown, ", "))
	}
	return c.validate()
}

func (s setting) set(v string) error {
	switch s.kind {
	case kString:
		*s.ptr.(*string) = v
	case kInt:
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("%q is not a whole number", v)
		}
		*s.ptr.(*int) = n
	case kBytes:
		n, err := ParseBytes(v)
		if err != nil {
			return err
		}
		*s.ptr.(*int64) = n
	case kDuration:
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			return fmt.Errorf("%q is not a duration like 30s or 5m", v)
		}
		*s.ptr.(*time.Duration) = d
	case kList:
		var out []string
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				out = append(out, f)
			}
		}
		*s.ptr.(*[]string) = out
	case kObject:
		// Values are never echoed: this kind carries credentials.
		if err := json.Unmarshal([]byte(v), s.ptr); err != nil {
			return fmt.Errorf("not a JSON object of the right shape (%s)", jsonShape(s.ptr))
		}
	}
	return nil
}

func jsonShape(ptr any) string {
	switch ptr.(type) {
	case *map[string]map[string]string:
		return `{"host": {"username": "...", "password": "..."}}`
	case *map[string][]string:
		return `{"group": ["tenant-a", "tenant-b"]}`
	default:
		return `{"key": "value"}`
	}
}

// ParseBytes reads a size: a bare integer is bytes; units are binary
// (KiB, MiB, GiB, and K/M/G/KB/MB/GB meaning the same).
func ParseBytes(v string) (int64, error) {
	v = strings.TrimSpace(v)
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("size %q is negative", v)
		}
		return n, nil
	}
	n, err := units.RAMInBytes(v)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size like 20GiB, 512MiB or 1073741824", v)
	}
	return n, nil
}

func readFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config file: %w", err)
	}
	var tree map[string]any
	if err := yaml.Unmarshal(data, &tree); err != nil {
		return nil, fmt.Errorf("config file %s is not valid YAML: %w", path, err)
	}
	whole := map[string]bool{}
	var c Config
	for _, st := range c.settings() {
		if st.kind == kObject || st.kind == kList {
			whole[st.key] = true
		}
	}
	out := map[string]string{}
	flatten("", tree, out, whole)
	return out, nil
}

// flatten turns nested YAML into dotted keys, keeping the values of
// object and list settings whole (as JSON, or a comma list).
func flatten(prefix string, v any, out map[string]string, whole map[string]bool) {
	if whole[prefix] {
		if l, ok := v.([]any); ok {
			var parts []string
			for _, e := range l {
				parts = append(parts, fmt.Sprint(e))
			}
			out[prefix] = strings.Join(parts, ",")
			return
		}
		b, _ := json.Marshal(v)
		out[prefix] = string(b)
		return
	}
	switch t := v.(type) {
	case map[string]any:
		for k, c := range t {
			key := k
			if prefix != "" {
				key = prefix + "." + k
			}
			flatten(key, c, out, whole)
		}
	case nil:
	default:
		out[prefix] = fmt.Sprint(t)
	}
}

func (c *Config) validate() error {
	switch c.Runtime {
	case "process", "vm", "auto":
	default:
		return fmt.Errorf("runtime %q is unknown: use process, vm or auto", c.Runtime)
	}
	if err := c.validateRegistryStorage(); err != nil {
		return err
	}
	if i := strings.Index(c.Database, "://"); i > 0 && !strings.HasPrefix(c.Database, "postgres://") && !strings.HasPrefix(c.Database, "postgresql://") {
		// Only the scheme is shown: the rest may hold a password.
		return fmt.Errorf("database: %s:// databases are not supported: use a SQLite file path or a postgres:// URL", c.Database[:i])
	}
	if c.MaxConcurrent < 1 {
		return fmt.Errorf("max_concurrent_builds must be at least 1")
	}
	for _, p := range []struct {
		name     string
		def, max int
	}{
		{"limits.cpus", c.CPUsDefault, c.CPUsMax},
		{"limits.memory_mb", c.MemoryMBDefault, c.MemoryMBMax},
		{"limits.disk_gb", c.DiskGBDefault, c.DiskGBMax},
		{"limits.timeout_seconds", c.TimeoutSecDefault, c.TimeoutSecMax},
	} {
		if p.def < 1 || p.max < 1 {
			return fmt.Errorf("%s.default and .max must be at least 1", p.name)
		}
		if p.def > p.max {
			return fmt.Errorf("%s.default (%d) is over %s.max (%d)", p.name, p.def, p.name, p.max)
		}
	}
	if c.GCReservedPercent < 0 || c.GCMaxUsedPercent < 1 || c.GCMaxUsedPercent > 100 || c.GCReservedPercent > c.GCMaxUsedPercent {
		return fmt.Errorf("cache.gc_reserved_percent (%d) and cache.gc_max_used_percent (%d) must satisfy 0 <= reserved <= max_used <= 100", c.GCReservedPercent, c.GCMaxUsedPercent)
	}
	if c.TokensMaxTTL <= 0 {
		return fmt.Errorf("tokens.max_ttl must be positive")
	}
	if c.ContextStorePerTenant < 0 || c.ContextStoreTotal < 0 {
		return fmt.Errorf("context_store.max_bytes_per_tenant and context_store.max_total_bytes must not be negative (0: no limit)")
	}
	if c.BuildersIdleTimeout < 0 || c.BuildersMaxWarm < 0 {
		return fmt.Errorf("builders.idle_timeout and builders.max_warm must not be negative (0s turns builder reuse off)")
	}
	if c.UploadsMax < 0 || c.UploadsPerTenant < 0 {
		return fmt.Errorf("uploads.max_concurrent and uploads.max_per_tenant must not be negative")
	}
	if c.HTTPIdleTimeout <= 0 {
		return fmt.Errorf("http.idle_timeout must be positive")
	}
	if c.VMUnresponsive < 5*time.Second {
		return fmt.Errorf("vm.unresponsive (%s) must be at least 5s: a busy guest needs a moment to answer", c.VMUnresponsive)
	}
	if c.BuildsClientGoneAfter < 0 {
		return fmt.Errorf("builds.client_gone_after must not be negative (0s turns it off)")
	}
	if c.BuildsSSHSessionWait <= 0 {
		return fmt.Errorf("builds.ssh_session_wait must be positive")
	}
	if c.DedupTTL < 0 {
		return fmt.Errorf("dedup.ttl must not be negative")
	}
	for _, m := range append([]string{c.NetworkDefault}, c.NetworkAllowed...) {
		if m != "egress" && m != "isolated" {
			return fmt.Errorf("network mode %q is unknown: use egress or isolated (network.default, network.allowed)", m)
		}
	}
	if !slices.Contains(c.NetworkAllowed, c.NetworkDefault) {
		return fmt.Errorf("network.default %q is not in network.allowed %v", c.NetworkDefault, c.NetworkAllowed)
	}
	if c.SSEHeartbeat < 100*time.Millisecond {
		return fmt.Errorf("sse_heartbeat must be at least 100ms")
	}
	if c.ContextMaxBytes < 1 || c.ContextMaxUncompressedBytes < 1 || c.ContextMaxEntries < 1 {
		return fmt.Errorf("context limits must be positive")
	}
	return nil
}

// validateRegistryStorage checks the registry.storage settings; the
// registry checks the bucket itself when it starts.
func (c *Config) validateRegistryStorage() error {
	if c.registryS3PathStyle != "" {
		b, err := strconv.ParseBool(strings.TrimSpace(c.registryS3PathStyle))
		if err != nil {
			return fmt.Errorf("registry.s3.forcepathstyle %q is not true or false", c.registryS3PathStyle)
		}
		c.RegistryS3ForcePathStyle = b
	}
	switch c.RegistryStorage {
	case "filesystem":
	case "s3":
		if c.RegistryS3Bucket == "" {
			return fmt.Errorf("registry.storage is s3 but registry.s3.bucket is empty: name the bucket kiln keeps its images in")
		}
		if (c.RegistryS3AccessKey == "") != (c.RegistryS3SecretKey == "") {
			return fmt.Errorf("set both registry.s3.accesskey and registry.s3.secretkey, or neither to use the AWS environment")
		}
		switch c.RegistryS3Redirect {
		case "disable", "presigned":
		default:
			if !strings.HasPrefix(c.RegistryS3Redirect, "https://") && !strings.HasPrefix(c.RegistryS3Redirect, "http://") {
				return fmt.Errorf("registry.s3.redirect %q is unknown: use disable, presigned, or the store's public URL (https://host)", c.RegistryS3Redirect)
			}
		}
	default:
		return fmt.Errorf("registry.storage %q is unknown: use filesystem or s3", c.RegistryStorage)
	}
	return nil
}

// Keys lists every setting for documentation: key, env, flag, default, help.
func Keys() [][5]string {
	var c Config
	var out [][5]string
	for _, s := range c.settings() {
		out = append(out, [5]string{s.key, Env(s.key), "--" + Flag(s.key), s.def, s.help})
	}
	return out
}

// MaxWarm is builders.max_warm, or when it is 0 how many builders of the
// default memory fit in hostMemBytes with 4 GiB kept free (at least one).
func (c Config) MaxWarm(hostMemBytes int64) int {
	if c.BuildersMaxWarm > 0 {
		return c.BuildersMaxWarm
	}
	per := int64(max(c.MemoryMBDefault, 256)) << 20
	return int(max(1, (hostMemBytes-4<<30)/per))
}
