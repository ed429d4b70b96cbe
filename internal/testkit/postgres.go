package testkit

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
)

// PostgresServer is a PostgreSQL server a test started from Debian's
// postgresql package: its own cluster in a temp dir, run as an
// unprivileged user, listening on a free loopback port (trust auth for
// the role kiln, no password) with its unix socket in the temp dir. It
// is stopped and deleted when the test ends.
type PostgresServer struct {
	bin  string // the directory of initdb, pg_ctl, createdb
	dir  string // cluster data, socket and log live under it
	Port int

	mu sync.Mutex
	n  int
}

// RequirePostgresEnv, when set, turns a missing PostgreSQL installation
// from a skip into a failure.
const RequirePostgresEnv = "KILN_REQUIRE_POSTGRES"

// PostgresBinDir finds the binaries of the newest installed PostgreSQL
// (/usr/lib/postgresql/<version>/bin on Debian); they are not on PATH.
func PostgresBinDir() (string, error) {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(matches) == 0 {
		if p, err := exec.LookPath("initdb"); err == nil {
			return filepath.Dir(p), nil
		}
		return "", fmt.Errorf("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb (Debian package postgresql; make test installs it)")
	}
	version := func(p string) int {
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
		return n
	}
	sort.Slice(matches, func(i, j int) bool { return version(matches[i]) > version(matches[j]) })
	return filepath.Dir(matches[0]), nil
}

// StartPostgres starts a PostgreSQL server for t. Without PostgreSQL
// installed it skips t, unless KILN_REQUIRE_POSTGRES is set.
func StartPostgres(t testing.TB) *PostgresServer {
	t.Helper()
	bin, err := PostgresBinDir()
	if err != nil {
		if os.Getenv(RequirePostgresEnv) != "" {
			t.Fatalf("%v (%s is set)", err, RequirePostgresEnv)
		}
		t.Skipf("%v; set %s=1 to fail instead of skipping", err, RequirePostgresEnv)
	}
	parent := os.TempDir()
	if fi, err := os.Stat(parent); os.Geteuid() == 0 && (err != nil || fi.Mode().Perm()&0o001 == 0) {
		parent = "/tmp" // the postgres user must reach the cluster's directory
	}
	dir, err := os.MkdirTemp(parent, "kiln-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &PostgresServer{bin: bin, dir: dir}
	if os.Geteuid() == 0 {
		// initdb and postgres refuse to run as root: the cluster belongs
		// to the postgres user the package created.
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root, the cluster needs the unprivileged user postgres (made by the postgresql package): %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := p.asOwner("initdb", "-D", p.data(), "-U", "kiln", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	var out []byte
	for try := 0; try < 5; try++ {
		p.Port = freePort(t)
		opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off", p.Port, dir)
		out, err = p.asOwner("pg_ctl", "-D", p.data(), "-l", filepath.Join(dir, "server.log"), "-w", "-t", "60", "-o", opts, "start").CombinedOutput()
		if err == nil {
			break
		}
	}
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	t.Cleanup(func() {
		if out, err := p.asOwner("pg_ctl", "-D", p.data(), "-m", "immediate", "-w", "stop").CombinedOutput(); err != nil {
			t.Logf("pg_ctl stop: %v\n%s", err, out)
		}
	})
	return p
}

// Postgres starts a server for t and returns the URL of an empty
// database on it.
func Postgres(t testing.TB) string {
	t.Helper()
	return StartPostgres(t).NewDatabase(t)
}

// NewDatabase creates an empty database and returns its URL
// (postgres://kiln@127.0.0.1:port/name?sslmode=disable).
func (p *PostgresServer) NewDatabase(t testing.TB) string {
	t.Helper()
	p.mu.Lock()
	p.n++
	name := fmt.Sprintf("kiln_%d", p.n)
	p.mu.Unlock()
	cmd := exec.Command(filepath.Join(p.bin, "createdb"), "-h", p.dir, "-p", strconv.Itoa(p.Port), "-U", "kiln", name)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("createdb %s: %v\n%s", name, err, out)
	}
	return fmt.Sprintf("postgres://kiln@127.0.0.1:%d/%s?sslmode=disable", p.Port, name)
}

func (p *PostgresServer) data() string { return filepath.Join(p.dir, "data") }

// asOwner runs one of the server binaries as the cluster's owner.
func (p *PostgresServer) asOwner(name string, args ...string) *exec.Cmd {
	path := filepath.Join(p.bin, name)
	var cmd *exec.Cmd
	if os.Geteuid() == 0 {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = p.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8")
	return cmd
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
