package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/sshrelay"
)

// kiln build --ssh, as docker buildx spells it:
// default|ID[=SOCKET|KEYFILE[,KEYFILE…]]. A socket (the default:
// $SSH_AUTH_SOCK) is forwarded: only the id is submitted, and once the
// build is, the build's ssh session (internal/sshrelay) carries each agent
// connection of its steps here, to be answered from the agent, read-only.
// Key files are sent with the submission like secrets; the server serves
// them from memory.

// sshForm reads the --ssh flags into the form: forwarded agents (id →
// socket) and key files.
func (f *buildFlags) sshForm(form *buildForm, add func(name, value string), lookupEnv func(string) (string, bool)) error {
	agents, keys, err := readSSH(f.ssh, lookupEnv)
	if err != nil {
		return err
	}
	if len(agents) > 0 && f.detach {
		return errors.New("--ssh forwards your ssh-agent while the build runs, which --detach does not wait for: drop --detach, or give key files (--ssh ID=KEYFILE), which are sent with the build")
	}
	ids := make([]string, 0, len(agents))
	for id := range agents {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		add("ssh", id)
	}
	form.sshAgents, form.sshKeys = agents, keys
	return nil
}

// readSSH parses --ssh values. Sockets are checked to answer; key files
// are read and parsed, so an encrypted or broken key is a usage error
// here rather than a failed build.
func readSSH(specs []string, lookupEnv func(string) (string, bool)) (agents map[string]string, keys []secret, err error) {
	seen := map[string]bool{}
	for _, spec := range specs {
		id, paths, hasPaths := strings.Cut(spec, "=")
		if !sshrelay.ValidID(id) {
			return nil, nil, fmt.Errorf("--ssh %q: use default or ID, optionally =SOCKET or =KEYFILE[,KEYFILE…]; an ID is 1-128 letters, digits, '.', '_' or '-'", spec)
		}
		if seen[id] {
			return nil, nil, fmt.Errorf("--ssh %s is given twice; give each id once (several key files: --ssh %s=KEY1,KEY2)", id, id)
		}
		seen[id] = true
		if !hasPaths || paths == "" {
			sock, _ := lookupEnv("SSH_AUTH_SOCK")
			if sock == "" {
				return nil, nil, fmt.Errorf("--ssh %s forwards the ssh-agent at $SSH_AUTH_SOCK, which is not set: start one (eval \"$(ssh-agent)\"; ssh-add), or name a socket or key file (--ssh %s=PATH)", id, id)
			}
			paths = sock
		}
		var files [][]byte
		socket := ""
		for _, p := range strings.Split(paths, ",") {
			fi, err := os.Stat(p)
			if err != nil {
				return nil, nil, fmt.Errorf("--ssh %s: %v", id, err)
			}
			if fi.Mode()&os.ModeSocket != 0 {
				if socket != "" || len(files) > 0 || strings.Contains(paths, ",") {
					return nil, nil, fmt.Errorf("--ssh %s: give one agent socket, or key files, not both or several sockets", id)
				}
				if err := checkAgent(p); err != nil {
					return nil, nil, fmt.Errorf("--ssh %s: the ssh-agent at %s does not answer: %v", id, p, err)
				}
				socket = p
				continue
			}
			data, err := readKeyFile(p)
			if err != nil {
				return nil, nil, fmt.Errorf("--ssh %s=%s: %w", id, p, err)
			}
			files = append(files, data)
		}
		if socket != "" {
			if agents == nil {
				agents = map[string]string{}
			}
			agents[id] = socket
			continue
		}
		for _, data := range files {
			keys = append(keys, secret{id: id, value: data})
		}
	}
	if len(agents)+len(keys) > sshrelay.MaxKeys || len(seen) > sshrelay.MaxIDs {
		return nil, nil, fmt.Errorf("--ssh: at most %d ids and %d key files", sshrelay.MaxIDs, sshrelay.MaxKeys)
	}
	return agents, keys, nil
}

// readKeyFile reads and checks one private key file; its errors never
// quote the file.
func readKeyFile(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, sshrelay.MaxKeyBytes+1))
	if err != nil {
		return nil, err
	}
	if _, err := sshrelay.ParseKey(data); err != nil {
		clear(data)
		return nil, err
	}
	return data, nil
}

// checkAgent connects to the agent at sock, so a dead socket is said now
// rather than by a failing step.
func checkAgent(sock string) error {
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// sshSessionRetries bounds how often a broken ssh session is opened
// again (about 40s in all: the server may hold the broken one until its
// keepalive gives up on it).
const sshSessionRetries = 10

// startSSHSession serves the build's forwarded agents (id → socket) over
// its ssh session until stop is called: opened right after the submission
// (the build waits for it), and opened again if the connection breaks
// while the build runs. Problems are warnings: the build says itself what
// failed for want of an agent.
func startSSHSession(ctx context.Context, c *client, build string, agents map[string]string, stderr io.Writer) (stop func()) {
	if len(agents) == 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for try := 1; ; try++ {
			err := serveSSHSession(ctx, c, build, agents)
			if ctx.Err() != nil {
				return
			}
			// The server ends the session when the build ends; a
			// connection that closed while it runs is opened again.
			if b, gerr := c.getBuild(ctx, build); gerr == nil && terminal(b.Status) {
				return
			}
			if err == nil {
				err = errors.New("the connection closed while the build runs")
			}
			// A conflict is the server still holding the broken session
			// until its keepalive gives up on it: try again.
			var ae *apiError
			if errors.As(err, &ae) && ae.Status != http.StatusConflict || try > sshSessionRetries {
				fmt.Fprintf(stderr, "kiln: warning: ssh session of build %s: %v; steps that use --ssh %s fail\n", build, err, strings.Join(slices.Sorted(maps.Keys(agents)), ", "))
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(min(try, 5)) * time.Second):
			}
		}
	}()
	return func() { cancel(); <-done }
}

// serveSSHSession opens the build's ssh session and answers it until it
// ends: nil when its connection closed (the server ended it, or it
// dropped), an error when it could not be opened or served.
func serveSSHSession(ctx context.Context, c *client, build string, agents map[string]string) error {
	conn, err := c.upgrade(ctx, "/v1/builds/"+build+"/ssh", sshrelay.Protocol)
	if err != nil {
		return err
	}
	return sshrelay.Serve(ctx, conn, func(id string) (sshrelay.Handler, error) {
		sock, ok := agents[id]
		if !ok {
			return nil, fmt.Errorf("kiln build forwards no ssh agent %q (it forwards %s)", id, strings.Join(slices.Sorted(maps.Keys(agents)), ", "))
		}
		local, err := net.DialTimeout("unix", sock, 5*time.Second)
		if err != nil {
			return nil, fmt.Errorf("the client's ssh-agent for %q does not answer: %v", id, err)
		}
		return func(stream net.Conn) {
			defer local.Close()
			defer stream.Close()
			// Read-only: the build may list keys and sign, never add,
			// remove or lock keys in the user's agent.
			agent.ServeAgent(sshrelay.ReadOnly(agent.NewClient(local)), stream)
		}, nil
	})
}

// upgrade opens path with Connection: Upgrade and returns the connection
// once the server switched to protocol. HTTP/2 cannot upgrade, so the
// request goes over HTTP/1.1 whatever the server offers; proxies from the
// environment are used as for any request.
func (c *client) upgrade(ctx context.Context, path, protocol string) (io.ReadWriteCloser, error) {
	base, ok := c.http.Transport.(*http.Transport)
	if !ok || base == nil {
		base = http.DefaultTransport.(*http.Transport)
	}
	t := base.Clone()
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP1(true)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(path), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", protocol)
	c.authorize(req)
	resp, err := (&http.Client{Transport: t}).Do(req)
	if err != nil {
		return nil, c.transportError(ctx, "open the build's ssh session", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		return nil, c.readError(resp)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, errors.New("open the build's ssh session: the connection cannot be taken over (a proxy that does not pass Upgrade?)")
	}
	return rwc, nil
}
