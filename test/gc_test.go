package test

import (
	"fmt"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
)

// Deleting every name of an image and collecting the registry's garbage
// frees the layers only that image used; an image sharing the base still
// pulls completely, and an identical resubmission of the collected build
// builds again instead of answering with an image that is gone.
func TestRegistryGCFreesOnlyDeletedImages(t *testing.T) {
	s := startServer(t)
	base := s.base()
	submit := func(tag, name string) submission {
		return submission{
			files:  map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN head -c 3000000 /dev/urandom > /%s\n", base, name)},
			fields: [][2]string{{"tags", tag}},
		}
	}
	gone := mustSucceed(t, s, s.admin, s.build(s.admin, submit("gc/gone:1", "gone")))
	mustSucceed(t, s, s.admin, s.build(s.admin, submit("gc/kept:1", "kept")))

	reader := s.token("reader", "reader", "build:read", "build:write", "image:read", "image:write")
	if resp := s.do(reader, "POST", "/v1/registry/gc", nil, ""); resp.StatusCode != http.StatusForbidden {
		t.Errorf("registry gc without build:admin: %d, want 403", resp.StatusCode)
	}

	for _, name := range []string{"gc/gone:1", "builds/" + gone.Id + ":latest"} {
		if resp := s.do(s.admin, "DELETE", "/v1/images/"+name, nil, ""); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("delete %s: %d", name, resp.StatusCode)
		}
	}
	out, code := s.kiln(s.admin, "registry", "gc")
	m := regexp.MustCompile(`deleted (\d+) of (\d+) blobs, freed ([\d.]+) (MiB|KiB)`).FindStringSubmatch(out)
	if code != 0 || m == nil {
		t.Fatalf("kiln registry gc: exit %d\n%s", code, out)
	}
	// The random layer (3 MB, incompressible), its config and manifest.
	if n, _ := strconv.Atoi(m[1]); n != 3 {
		t.Errorf("gc deleted %s blobs, want the deleted image's layer, config and manifest (3)", m[1])
	}
	if mib, _ := strconv.ParseFloat(m[3], 64); m[4] != "MiB" || mib < 2.8 {
		t.Errorf("gc freed %s %s, want the 3 MB layer", m[3], m[4])
	}
	out, code = s.kiln(s.admin, "registry", "gc")
	if code != 0 || !regexp.MustCompile(`deleted 0 of \d+ blobs`).MatchString(out) {
		t.Errorf("a second gc should find nothing to delete: exit %d\n%s", code, out)
	}

	// The kept image and the base both still pull, layers included.
	for _, ref := range []string{"gc/kept:1", "base/busybox:latest"} {
		dir := t.TempDir()
		if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--src-creds", "kiln:"+s.admin,
			"docker://"+s.addr+"/"+ref, "dir:"+dir).CombinedOutput(); err != nil {
			t.Errorf("pull %s after gc: %v\n%s", ref, err, out)
		}
	}

	again := mustSucceed(t, s, s.admin, s.build(s.admin, submit("gc/gone:2", "gone")))
	if again.DedupOf != nil {
		t.Errorf("resubmission was answered from build %s, whose image gc removed", *again.DedupOf)
	}
	if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/gc/gone:2") {
		t.Errorf("rebuilt image does not pull")
	}
}
