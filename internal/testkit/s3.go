package testkit

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	kilnregistry "github.com/kiln-build/kiln/internal/registry"
)

// S3Server is a real S3-compatible server for a test: versitygw (Apache
// 2.0, a go.mod tool) serving a temporary directory through its posix
// backend, on a loopback port, with one bucket. Every object of the bucket
// is a file under BucketDir, so tests can check what landed in the store
// without going through the code under test.
type S3Server struct {
	Endpoint  string // http://127.0.0.1:port
	Region    string
	AccessKey string
	SecretKey string
	Bucket    string
	// BucketDir is the directory the bucket's objects are files under.
	BucketDir string
}

// RegistryStorage is kiln's registry storage on this server's bucket,
// under the key prefix rootDir ("" for the bucket's root).
func (s *S3Server) RegistryStorage(rootDir string) kilnregistry.StorageConfig {
	return kilnregistry.StorageConfig{Driver: kilnregistry.DriverS3, S3: kilnregistry.S3Config{
		Bucket: s.Bucket, Region: s.Region, RegionEndpoint: s.Endpoint, ForcePathStyle: true,
		AccessKey: s.AccessKey, SecretKey: s.SecretKey, RootDirectory: rootDir,
	}}
}

// ObjectFile is the file holding object key ("a/b/c") of the bucket.
func (s *S3Server) ObjectFile(key string) string {
	return filepath.Join(s.BucketDir, filepath.FromSlash(strings.TrimPrefix(key, "/")))
}

var versitygwTool = &goToolOnce{env: "KILN_VERSITYGW", name: "versitygw", pkg: "github.com/versity/versitygw/cmd/versitygw"}

// Versitygw returns the path of a versitygw binary: $KILN_VERSITYGW if
// set, else <repo>/bin/versitygw, built from the go.mod tool dependency
// when missing or older than go.mod.
func Versitygw(t testing.TB) string { t.Helper(); return versitygwTool.path(t) }

// StartS3 starts versitygw on a free loopback port over a temporary
// directory, with bucket "kiln", and stops it when the test ends.
func StartS3(t testing.TB) *S3Server {
	t.Helper()
	bin := Versitygw(t)
	dir, meta := t.TempDir(), t.TempDir()
	var key [12]byte
	_, _ = rand.Read(key[:])
	s := &S3Server{Region: "us-east-1", AccessKey: "kilntest", SecretKey: hex.EncodeToString(key[:]), Bucket: "kiln"}
	// The posix backend serves each top-level directory as a bucket.
	s.BucketDir = filepath.Join(dir, s.Bucket)
	if err := os.Mkdir(s.BucketDir, 0o755); err != nil {
		t.Fatal(err)
	}
	var lastErr error
	// The port is picked free and then handed over, so another process
	// may take it in between: try a few.
	for range 5 {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		var logs bytes.Buffer
		// Object metadata goes to a sidecar directory rather than xattrs,
		// which not every temporary filesystem has.
		cmd := exec.Command(bin, "--access", s.AccessKey, "--secret", s.SecretKey, "--region", s.Region,
			"--port", addr, "--quiet", "posix", "--sidecar", meta, dir)
		cmd.Stdout, cmd.Stderr = &logs, &logs
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start versitygw: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		s.Endpoint = "http://" + addr
		if lastErr = waitHTTP(s.Endpoint, exited, 20*time.Second); lastErr == nil {
			t.Cleanup(func() {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
				case <-time.After(10 * time.Second):
					_ = cmd.Process.Kill()
					<-exited
				}
			})
			return s
		}
		_ = cmd.Process.Kill()
		<-exited
		lastErr = fmt.Errorf("%w\n%s", lastErr, logs.String())
	}
	t.Fatalf("versitygw did not start: %v", lastErr)
	return nil
}

// waitHTTP waits until u answers HTTP at all (S3 answers an unsigned
// request 403), the process exits, or limit passes.
func waitHTTP(u string, exited <-chan error, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("versitygw exited: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("versitygw did not answer at %s within %s: %v", u, limit, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
