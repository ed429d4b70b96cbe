package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// With its registry on S3 (a real S3 server, versitygw) kiln builds from a
// base in its own registry, serves pulls, converts the image to a root
// filesystem and exports it as an OCI tarball (both read blobs from the
// bucket), collects garbage in the bucket, and builds again after.
func TestRegistryOnS3(t *testing.T) {
	s3 := testkit.StartS3(t)
	const prefix = "kiln"
	s := startServer(t, withArgs("--registry-storage", "s3", "--registry-s3-bucket", s3.Bucket,
		"--registry-s3-regionendpoint", s3.Endpoint, "--registry-s3-forcepathstyle", "true",
		"--registry-s3-rootdirectory", prefix,
		"--registry-s3-accesskey", s3.AccessKey, "--registry-s3-secretkey", s3.SecretKey))
	if strings.Contains(s.logs(), s3.SecretKey) {
		t.Fatal("kiln serve logged the S3 secret key")
	}
	base := s.base()
	dockerfile := func(name string) string {
		return fmt.Sprintf("FROM %s\nRUN head -c 1000000 /dev/urandom > /%s\n", base, name)
	}
	gone := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": dockerfile("gone")},
		fields: [][2]string{{"tags", "s3/gone:1"}}}))
	// --output type=oci|docker and type=local|tar, as kiln build fetches them.
	ociFile := filepath.Join(t.TempDir(), "img.tar")
	resp := s.do(s.admin, "GET", "/v1/builds/"+gone.Id+"/output?type=oci", nil, "")
	f, err := os.Create(ociFile)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(f, resp.Body)
	resp.Body.Close()
	f.Close()
	if resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("OCI output: %d, %v", resp.StatusCode, err)
	}
	if out, err := exec.Command("skopeo", "inspect", "oci-archive:"+ociFile).CombinedOutput(); err != nil {
		t.Errorf("the OCI output exported from the bucket does not read: %v\n%s", err, out)
	}
	resp = s.do(s.admin, "GET", "/v1/builds/"+gone.Id+"/output?type=tar", nil, "")
	names := tarEntries(t, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(names, "gone") {
		t.Errorf("tar output: %d, entries %.300s", resp.StatusCode, names)
	}
	if im := s.waitRootFS("s3%2Fgone:1"); im.Rootfs.Status != api.RootFSStatusReady {
		t.Errorf("root filesystem conversion from the bucket: %+v", im.Rootfs)
	}
	// The content is in the bucket, under the prefix, and not on local disk.
	if _, err := os.Stat(s3.ObjectFile(prefix + "/docker/registry/v2/blobs/sha256")); err != nil {
		t.Errorf("no blobs in the bucket: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.data, "registry")); !os.IsNotExist(err) {
		t.Errorf("kiln made a local registry directory with s3 storage: %v", err)
	}
	pulled := t.TempDir()
	if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--src-creds", "kiln:"+s.admin,
		"docker://"+s.addr+"/s3/gone:1", "dir:"+pulled).CombinedOutput(); err != nil {
		t.Fatalf("pull s3/gone:1 through kiln's registry: %v\n%s", err, out)
	}

	for _, name := range []string{"s3/gone:1", "builds/" + gone.Id + ":latest"} {
		if resp := s.do(s.admin, "DELETE", "/v1/images/"+name, nil, ""); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("delete %s: %d", name, resp.StatusCode)
		}
	}
	out, code := s.kiln(s.admin, "registry", "gc")
	m := regexp.MustCompile(`deleted (\d+) of (\d+) blobs`).FindStringSubmatch(out)
	if code != 0 || m == nil {
		t.Fatalf("kiln registry gc on S3: exit %d\n%s", code, out)
	}
	if n, _ := strconv.Atoi(m[1]); n != 3 {
		t.Errorf("gc deleted %s blobs, want the deleted image's layer, config and manifest (3)\n%s", m[1], out)
	}

	// The base survived the collection: a new build on it works and pulls.
	again := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: map[string]string{"Dockerfile": dockerfile("kept")},
		fields: [][2]string{{"tags", "s3/kept:1"}}}))
	if again.DedupOf != nil {
		t.Errorf("a new build was answered from build %s", *again.DedupOf)
	}
	if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/s3/kept:1") {
		t.Errorf("the image built after gc does not pull")
	}
}
