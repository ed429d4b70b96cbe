package solve

import "time"

// Request is everything one BuildKit solve needs. It is plain data so the
// VM runtime can hand it to the guest agent unchanged; fields marked
// memory-only must never be written to disk or logs.
type Request struct {
	// ContextDir is the extracted build context.
	ContextDir string `json:"context_dir"`
	// DockerfileDir holds the Dockerfile; equal to ContextDir unless the
	// Dockerfile was sent inline.
	DockerfileDir string `json:"dockerfile_dir"`
	// DockerfileName is the Dockerfile's path relative to DockerfileDir.
	DockerfileName string `json:"dockerfile_name"`
	// ContextKey keys BuildKit's incremental context transfer, which
	// reuses the last transfer under the same key and resends only files
	// whose size or mtime differ. Callers share a key only between
	// contexts whose files' mtimes follow their content (kiln's do, see
	// buildcontext.ContentTime); empty means a fresh transfer.
	ContextKey string `json:"context_key,omitempty"`
	// ContextURL, if set, is a git URL (remote#commit[:subdir]) BuildKit
	// fetches as the build context in place of ContextDir, which is then
	// ignored. The Dockerfile is DockerfileName inside it, unless
	// InlineDockerfile says DockerfileDir holds it.
	ContextURL string `json:"context_url,omitempty"`
	// InlineDockerfile: with ContextURL, the Dockerfile is the one in
	// DockerfileDir rather than the repository's.
	InlineDockerfile bool `json:"inline_dockerfile,omitempty"`

	// Call is what the frontend is asked for: "" builds, CallCheck runs
	// the Dockerfile's checks only (docker build --check).
	Call string `json:"call,omitempty"`

	BuildArgs map[string]string `json:"build_args,omitempty"`
	Target    string            `json:"target,omitempty"`
	// Platforms are the os/arch[/variant] the result is built for, in
	// order; empty is the builder's own. More than one makes the result
	// an image index with a manifest per platform. The builder runs a
	// foreign platform's steps under QEMU user-mode emulation.
	Platforms []string `json:"platforms,omitempty"`
	NoCache   bool     `json:"no_cache,omitempty"`
	Pull      bool     `json:"pull,omitempty"`

	// Knobs of docker build: image labels (--label), manifest
	// annotations (--annotation), extra /etc/hosts lines for RUN
	// ("host=ip", --add-host), /dev/shm size in bytes (--shm-size) and
	// RUN ulimits ("nofile=1024:2048", --ulimit).
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	AddHosts    []string          `json:"add_hosts,omitempty"`
	ShmSize     int64             `json:"shm_size,omitempty"`
	Ulimits     []string          `json:"ulimits,omitempty"`

	// Entitlements the solve asks for (network.host,
	// security.insecure); the daemon must grant them too.
	Entitlements []string `json:"entitlements,omitempty"`

	// Secrets are served to RUN --mount=type=secret through the session.
	// Memory-only.
	Secrets map[string][]byte `json:"-"`

	// SSH are the ssh-agent ids RUN --mount=type=ssh may use (buildx
	// --ssh; "default" is a mount's id when it names none); SSHAgent
	// connects each. Plain data: a builder VM's agent dials them back to
	// the host.
	SSH []string `json:"ssh,omitempty"`
	// SSHAgent opens the agent connections of SSH. Memory-only; never
	// encoded.
	SSHAgent SSHDialer `json:"-"`

	// Push lists full image references (host/repo:tag) the result is
	// pushed to. The first one is the canonical builds/<id> name.
	Push []string `json:"push"`

	// RegistryAuth maps a registry host to the credentials BuildKit uses
	// for it (pull of bases, push of results, cache import/export).
	// Memory-only.
	RegistryAuth map[string]Credentials `json:"-"`

	// CacheImports are registry cache refs imported read-only.
	CacheImports []string `json:"cache_imports,omitempty"`
	// CacheExport, if set, is a registry cache ref the solve exports to,
	// in CacheExportMode: min (the result's layers) or max (every
	// stage's; the default).
	CacheExport     string `json:"cache_export,omitempty"`
	CacheExportMode string `json:"cache_export_mode,omitempty"`

	// NamedContexts replaces images the Dockerfile names: name → source,
	// e.g. "node:22" → "docker-image://kiln:5000/mirror/docker.io/library/node@sha256:…".
	// The name is what BuildKit's frontend looks up for a FROM: the
	// familiar reference without ":latest" (mirror.Pinned.ContextName).
	NamedContexts map[string]string `json:"named_contexts,omitempty"`
	// LocalContexts are named contexts from directories (--build-context
	// NAME=DIR): name → directory, sent to BuildKit like the main
	// context. A name here must not also be in NamedContexts.
	LocalContexts map[string]string `json:"local_contexts,omitempty"`

	// Attests are the attestations BuildKit attaches to the image, as
	// buildx passes them to the frontend: type → its options without
	// "type=", e.g. "provenance" → "mode=max", "sbom" →
	// "generator=kiln:5000/mirror/…@sha256:…". With any of them the
	// result is an image index holding the image and an attestation
	// manifest (vnd.docker.reference.type: attestation-manifest).
	Attests map[string]string `json:"attests,omitempty"`
}

// Credentials for one registry host. Memory-only.
type Credentials struct {
	Username string
	Password string
}

// Result is what a successful solve produced.
type Result struct {
	// Digest is the pushed image manifest digest (sha256:…).
	Digest string `json:"digest"`
	// StepsTotal and StepsCached count the solve's vertices, so callers
	// can see how warm a build was.
	StepsTotal  int `json:"steps_total"`
	StepsCached int `json:"steps_cached"`
	// Timings are how long the solve spent in the parts of it a user
	// waits on (TimingContext, TimingExport, TimingPush), from
	// BuildKit's own step and status times.
	Timings map[string]time.Duration `json:"timings,omitempty"`
	// Check is the result of a CallCheck request.
	Check *Check `json:"check,omitempty"`
}

// CallCheck asks the Dockerfile frontend for its checks (lint rules)
// instead of a build.
const CallCheck = "check"

// Check is what the Dockerfile's checks found.
type Check struct {
	// Warnings counts the rule violations.
	Warnings int `json:"warnings"`
	// Report prints them as docker build --check does: each rule, its
	// description and the Dockerfile lines it points at.
	Report string `json:"report,omitempty"`
	// Error is a problem that kept the checks from completing (a
	// Dockerfile that does not parse).
	Error string `json:"error,omitempty"`
}

// Timing names in Result.Timings.
const (
	// TimingContext is the transfer of the build context into BuildKit.
	TimingContext = "context_transfer"
	// TimingExport is the image export, without its push.
	TimingExport = "export"
	// TimingPush is the push of the result to the registry.
	TimingPush = "push"
)
