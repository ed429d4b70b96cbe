package server

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/sshrelay"
)

// errNoUpgrade: GET /v1/builds/{id}/ssh without asking for the upgrade.
var errNoUpgrade = errors.New("no upgrade asked for")

// buildSSH is the build's ssh session (see internal/sshrelay): once the
// build service has checked the caller may serve the build's agents, the
// connection is hijacked, answered 101 and handed to the service until
// the build or the session ends.
func (s *Server) buildSSH(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	hijacked := false
	err := s.builds.AttachSSH(r.Context(), principal(r), id, func() (builds.SSHSession, error) {
		if !upgradeTo(r, sshrelay.Protocol) {
			return nil, errNoUpgrade
		}
		conn, err := hijack(w)
		if err != nil {
			return nil, err
		}
		hijacked = true
		return sshrelay.Server(conn)
	})
	switch {
	case err == nil:
	case hijacked:
		s.log.Warn("build ssh session failed", "build", id, "err", err)
	case errors.Is(err, errNoUpgrade):
		w.Header().Set("Upgrade", sshrelay.Protocol)
		w.Header().Set("Connection", "Upgrade")
		writeError(w, http.StatusUpgradeRequired, "upgrade_required",
			"GET /v1/builds/{id}/ssh upgrades the connection to the build's ssh session: send it over HTTP/1.1 with Connection: Upgrade and Upgrade: "+sshrelay.Protocol+" (kiln build --ssh does)")
	default:
		s.fail(w, r, err)
	}
}

// upgradeTo reports whether r asks to switch to protocol.
func upgradeTo(r *http.Request, protocol string) bool {
	if r.ProtoMajor != 1 || !strings.EqualFold(strings.TrimSpace(r.Header.Get("Upgrade")), protocol) {
		return false
	}
	for _, v := range r.Header.Values("Connection") {
		for _, tok := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), "upgrade") {
				return true
			}
		}
	}
	return false
}

// hijack takes the connection over from net/http and answers 101.
func hijack(w http.ResponseWriter) (io.ReadWriteCloser, error) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, errdefs.Invalid("this connection cannot be upgraded (%v): open the ssh session over HTTP/1.1", err)
	}
	// The server's read and write deadlines were the request's; the
	// session lives as long as the build.
	conn.SetDeadline(time.Time{})
	if _, err := brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + sshrelay.Protocol + "\r\n\r\n"); err == nil {
		err = brw.Flush()
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("answer the upgrade: %w", err)
	}
	if brw.Reader.Buffered() == 0 {
		return conn, nil
	}
	// Bytes the client sent right behind its request are the session's.
	return &bufferedConn{Conn: conn, r: brw.Reader}, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// readSSHKey reads one ssh_key part (its filename is the agent id) into
// req. Its errors never quote the key.
func readSSHKey(req *builds.Request, part *multipart.Part) error {
	id := part.FileName()
	if id == "" {
		return errdefs.Invalid("an ssh_key part needs a filename, which is the ssh agent id (curl: -F 'ssh_key=@id_ed25519;filename=default')")
	}
	n := 0
	for _, files := range req.SSHKeys {
		n += len(files)
	}
	if n >= sshrelay.MaxKeys {
		return errdefs.Invalid("more than %d ssh key files", sshrelay.MaxKeys)
	}
	v, err := readLimited(part, sshrelay.MaxKeyBytes)
	if err != nil {
		return errdefs.Invalid("ssh key %s: %v", errdefs.Quote(id), err)
	}
	if req.SSHKeys == nil {
		req.SSHKeys = map[string][][]byte{}
	}
	req.SSHKeys[id] = append(req.SSHKeys[id], v)
	return nil
}
