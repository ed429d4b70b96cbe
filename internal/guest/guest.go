package guest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-build/kiln/internal/buildkitd"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
)

// Version is the protocol version this build of kiln speaks. Host and agent
// must speak the same one: the agent ships inside the builder image, so a
// mismatch means the image was built by a different kiln. Version 2: one
// session runs a setup and then any number of jobs, until the host
// releases the builder. Version 3: a job's named local contexts
// (solve.Request.LocalContexts) travel as context trees of their own
// ("named/N"), and the setup carries buildkitd's NoProxy hosts; an agent
// of version 2 would drop both without a word. Version 4: the setup
// carries buildkitd's entitlements and a job's solve request its call
// (check) and attestations, which an agent of version 3 would ignore:
// it would build instead of checking, or leave the attestations out.
// Version 5: a job's solve request names ssh agents (solve.Request.SSH),
// which the agent dials back to the host as tunnel streams "ssh/<id>";
// an agent of version 4 would drop them and fail every ssh mount. It
// would also drop the platforms (solve.Request.Platforms) and build the
// host's platform alone.
const Version = 5

// Job is everything the agent needs for one build. Its setup fields
// (CacheDisk, GC, InsecureRegistries, Network, MaxParallelism, NIC, Proxy,
// NoProxy; see Setup) are the builder's: they must equal the setup the session was
// connected with, and the agent acts on them once, at setup.
type Job struct {
	BuildID string `json:"build_id"`
	// Solve is the BuildKit request. On the host its ContextDir,
	// DockerfileDir and LocalContexts are host paths that the host streams
	// to the agent; Task.FetchContext turns them into guest paths. Its memory-only
	// fields (Secrets, RegistryAuth) travel in a separate part of the job
	// message because their JSON tags keep them out of any encoding.
	Solve solve.Request `json:"solve"`
	// CacheDisk is the serial of the virtio disk holding the cache volume
	// (/sys/block/vdX/serial inside the guest).
	CacheDisk string `json:"cache_disk"`
	// GC bounds BuildKit's garbage collection to the volume.
	GC buildkitd.GCPolicy `json:"gc"`
	// InsecureRegistries are hosts buildkitd reaches over plain HTTP (it
	// tries HTTPS first, without verifying): kiln's own registry's, and
	// external registries the operator listed as such.
	InsecureRegistries []string `json:"insecure_registries,omitempty"`
	// Network is the build steps' network mode; "", "host" and "default"
	// all mean the guest's own network.
	Network        string `json:"network,omitempty"`
	MaxParallelism int    `json:"max_parallelism,omitempty"`
	// Tunnels are TCP addresses the agent listens on inside the guest; each
	// accepted connection becomes one stream to the host, which connects
	// it with Host.Tunnels[Name].
	Tunnels []Tunnel `json:"tunnels,omitempty"`
	// NIC, when set, is the guest's network interface (the VM's
	// user-mode NIC); the agent configures it before buildkitd starts.
	// Without it the guest has only its loopback and the tunnels.
	NIC *NIC `json:"nic,omitempty"`
	// Proxy is the HTTP(S) proxy URL buildkitd itself uses for what it
	// fetches on its own (ADD <url>, git sources): the egress tunnel.
	Proxy string `json:"proxy,omitempty"`
	// NoProxy are host names buildkitd reaches without Proxy: the registry
	// host names the guest's hosts file maps to tunnels of its own. Only
	// with Proxy.
	NoProxy []string `json:"no_proxy,omitempty"`
	// Entitlements are the insecure entitlements buildkitd grants
	// (network.host, security.insecure).
	Entitlements []string `json:"entitlements,omitempty"`
}

// Setup is what a builder is set up with once per session, before its
// first job: the volume, buildkitd's configuration and the guest's network
// card. Every job of the session has the same (Job.Setup).
type Setup struct {
	CacheDisk          string             `json:"cache_disk"`
	GC                 buildkitd.GCPolicy `json:"gc"`
	InsecureRegistries []string           `json:"insecure_registries,omitempty"`
	Network            string             `json:"network,omitempty"`
	MaxParallelism     int                `json:"max_parallelism,omitempty"`
	NIC                *NIC               `json:"nic,omitempty"`
	Proxy              string             `json:"proxy,omitempty"`
	NoProxy            []string           `json:"no_proxy,omitempty"`
	Entitlements       []string           `json:"entitlements,omitempty"`
}

// Setup is the builder setup job needs.
func (j Job) Setup() Setup {
	return Setup{
		CacheDisk:          j.CacheDisk,
		GC:                 j.GC,
		InsecureRegistries: j.InsecureRegistries,
		Network:            j.Network,
		MaxParallelism:     j.MaxParallelism,
		NIC:                j.NIC,
		Proxy:              j.Proxy,
		NoProxy:            j.NoProxy,
		Entitlements:       j.Entitlements,
	}
}

// equal compares setups by their wire form, which is what the agent acts
// on.
func (s Setup) equal(o Setup) bool {
	a, _ := json.Marshal(s)
	b, _ := json.Marshal(o)
	return bytes.Equal(a, b)
}

// NIC is a static configuration of the guest's one network interface.
type NIC struct {
	Address string   `json:"address"` // with prefix length, e.g. 10.0.2.15/24
	Gateway string   `json:"gateway"`
	DNS     []string `json:"dns"`
	// Unreachable are prefixes the guest gets reject routes for, e.g. the
	// user-mode network's alias for the host's loopback.
	Unreachable []string `json:"unreachable,omitempty"`
}

// Tunnel is one TCP forward from the guest to the host.
type Tunnel struct {
	// Name selects the host-side Dialer: "registry" for kiln's registry,
	// "external:<host:port>" for another registry the build names,
	// "egress" for the HTTP CONNECT proxy. It is the name in every stream
	// header.
	Name string `json:"name"`
	// Listen is the guest address (ip:port) the agent listens on. For a
	// registry it is the same host:port the references name, so BuildKit
	// in the guest talks to the reference as given.
	Listen string `json:"listen"`
	// Host, when set, is a name the guest resolves to Listen's IP (the
	// agent writes it into /etc/hosts), for references that name the
	// registry by host name rather than by a loopback IP.
	Host string `json:"host,omitempty"`
}

// Errors callers can test for with errors.Is.
var (
	// ErrVersionMismatch: host and agent speak different protocol versions.
	ErrVersionMismatch = errors.New("guest protocol version mismatch")
	// ErrAgentGone: the connection to the agent ended before it answered
	// (the VM died, the agent crashed, the channel broke).
	ErrAgentGone = errors.New("guest agent went away")
	// ErrAgentUnresponsive: the agent stopped answering while its VM was
	// still there (a frozen guest kernel, a stopped hypervisor). It wraps
	// ErrAgentGone.
	ErrAgentUnresponsive = fmt.Errorf("%w: it stopped responding", ErrAgentGone)
	// ErrHostGone is the agent's view of ErrAgentGone; Session.Context's
	// cause when the host disappears.
	ErrHostGone = errors.New("connection to the host was lost")
	// ErrCanceledByHost is Task.Context's cause when the host canceled
	// the job (or the setup).
	ErrCanceledByHost = errors.New("host canceled the build")
	// ErrReleased is what Session.Next returns when the host released the
	// builder: stop buildkitd, release the volume, answer with
	// Session.Released and exit.
	ErrReleased = errors.New("host released the builder")
)

// Stream kinds, named in each stream's header.
const (
	kindControl = "control"
	kindEvents  = "events"
	kindContext = "context"
	kindTunnel  = "tunnel"
)

// Context transfer names: on the wire, Job.Solve.ContextDir and
// DockerfileDir hold these instead of host paths, and each value of
// Job.Solve.LocalContexts holds treeNamed followed by its index in the
// sorted names (named/0, named/1, …).
const (
	treeContext    = "context"
	treeDockerfile = "dockerfile"
	treeNamed      = "named/"
)

// Control message types.
const (
	msgSetup    = "setup"    // host → agent, first and once (seq 0)
	msgJob      = "job"      // host → agent, one per job (seq 1, 2, …), when idle
	msgCancel   = "cancel"   // host → agent, any time before the ack of seq
	msgAck      = "ack"      // host → agent, after done of seq
	msgRelease  = "release"  // host → agent, when idle: tear down and exit
	msgDone     = "done"     // agent → host, once per setup or job
	msgReleased = "released" // agent → host, once, answering release
)

const (
	protoName = "kiln-guest"
	// maxLine bounds a hello or stream header.
	maxLine = 4 << 10
	// maxFrame bounds one JSON frame. The guest runs untrusted builds, so
	// the host never buffers an unbounded message from it.
	maxFrame = 4 << 20
	// maxTunnels bounds concurrently open tunnel connections per job.
	maxTunnels = 64
	// ackTimeout bounds the agent's wait for the host's ack of its result.
	ackTimeout = 10 * time.Second
	// eventsDrain bounds the host's wait for the events stream to end after
	// the result arrived; the agent closes it before sending the result.
	eventsDrain = 10 * time.Second
)

// hello is the first thing on the wire, sent by the agent as one JSON line
// before any multiplexing: a virtio-serial port drops what the host sends
// while the guest has the port closed, so the host waits for it.
type hello struct {
	Proto   string `json:"proto"`
	Version int    `json:"version"`
	Agent   string `json:"agent,omitempty"`
}

// helloReply is the host's one-line answer; a non-empty Error means the
// host refuses the agent and closes the connection.
type helloReply struct {
	Version int    `json:"version"`
	Error   string `json:"error,omitempty"`
}

// streamHeader opens every stream; the host answers with a streamReply.
// Seq names the setup (0) or job the stream belongs to; the host refuses
// it unless that one is running (control has none).
type streamHeader struct {
	Kind string `json:"kind"`
	Name string `json:"name,omitempty"`
	Seq  int    `json:"seq"`
}

type streamReply struct {
	Error string `json:"error,omitempty"`
}

// hostMessage is a control frame from the host.
type hostMessage struct {
	Type  string `json:"type"`
	Seq   int    `json:"seq"`
	Setup *Setup `json:"setup,omitempty"`
	Job   *Job   `json:"job,omitempty"`
	// Memory carries the request's memory-only fields. It exists only in
	// the job frame, only on the wire, and is never logged.
	Memory *memoryOnly `json:"memory,omitempty"`
}

type memoryOnly struct {
	Secrets      map[string][]byte      `json:"secrets,omitempty"`
	RegistryAuth map[string]credentials `json:"registry_auth,omitempty"`
}

type credentials struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// agentMessage is a control frame from the agent.
type agentMessage struct {
	Type   string       `json:"type"`
	Seq    int          `json:"seq"`
	Result solve.Result `json:"result"`
	// Error is empty on success. Canceled marks a build that ended because
	// the host canceled it.
	Error    string `json:"error,omitempty"`
	Canceled bool   `json:"canceled,omitempty"`
	// Broken, in a done, says why the builder cannot take another job
	// (buildkitd exited, a job's cleanup failed); empty if it can.
	Broken string `json:"broken,omitempty"`
}

// eventFrame is one item on the events stream: a progress event for the
// build, or a log record of the agent itself.
type eventFrame struct {
	Event *progress.Event `json:"event,omitempty"`
	Log   *logRecord      `json:"log,omitempty"`
}

type logRecord struct {
	Time  time.Time `json:"time"`
	Level string    `json:"level"`
	Msg   string    `json:"msg"`
	// Attrs holds key, value, key, value… in the order they were logged.
	Attrs []string `json:"attrs,omitempty"`
}

func splitMemory(req solve.Request) (solve.Request, *memoryOnly) {
	m := &memoryOnly{Secrets: req.Secrets}
	if len(req.RegistryAuth) > 0 {
		m.RegistryAuth = make(map[string]credentials, len(req.RegistryAuth))
		for host, c := range req.RegistryAuth {
			m.RegistryAuth[host] = credentials{Username: c.Username, Password: c.Password}
		}
	}
	req.Secrets, req.RegistryAuth = nil, nil
	return req, m
}

func joinMemory(req solve.Request, m *memoryOnly) solve.Request {
	if m == nil {
		return req
	}
	req.Secrets = m.Secrets
	if len(m.RegistryAuth) > 0 {
		req.RegistryAuth = make(map[string]solve.Credentials, len(m.RegistryAuth))
		for host, c := range m.RegistryAuth {
			req.RegistryAuth[host] = solve.Credentials{Username: c.Username, Password: c.Password}
		}
	}
	return req
}
