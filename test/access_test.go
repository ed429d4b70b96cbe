package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
)

func TestTokensScopesAndRegistryPulls(t *testing.T) {
	s := startServer(t)
	base := s.base()
	writer := s.token("alice", "tenant-a", "build:read", "build:write")
	df := map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo hi > /hi\n", base)}

	t.Run("no token is 401", func(t *testing.T) {
		code, body := s.submit("", submission{files: df})
		if code != http.StatusUnauthorized {
			t.Errorf("status %d: %s", code, body)
		}
	})
	t.Run("bad token is 401", func(t *testing.T) {
		code, body := s.submit(writer+"x", submission{files: df})
		if code != http.StatusUnauthorized {
			t.Errorf("status %d: %s", code, body)
		}
	})
	t.Run("missing scope is 403", func(t *testing.T) {
		reader := s.token("rita", "", "build:read")
		code, body := s.submit(reader, submission{files: df})
		if code != http.StatusForbidden || !strings.Contains(string(body), "build:write") {
			t.Errorf("status %d: %s", code, body)
		}
	})
	t.Run("foreign cache scope is 403", func(t *testing.T) {
		code, body := s.submit(writer, submission{files: df, fields: [][2]string{{"cache_scope", "tenant-b"}}})
		if code != http.StatusForbidden || !strings.Contains(string(body), "tenant-a") {
			t.Errorf("status %d: %s", code, body)
		}
	})
	t.Run("own cache scope is fine", func(t *testing.T) {
		b := s.build(writer, submission{files: df, fields: [][2]string{{"cache_scope", "tenant-a"}}})
		mustSucceed(t, s, writer, b)
	})
	t.Run("global_cache without build:admin is 403", func(t *testing.T) {
		code, body := s.submit(writer, submission{files: df, fields: [][2]string{{"global_cache_key", "shared"}, {"global_cache", "true"}}})
		if code != http.StatusForbidden || !strings.Contains(string(body), "build:admin") {
			t.Errorf("status %d: %s", code, body)
		}
	})
	t.Run("global cache: admin exports, others import read-only", func(t *testing.T) {
		admin := s.token("ops", "ops", "build:read", "build:write", "build:admin")
		b := mustSucceed(t, s, admin, s.build(admin, submission{files: df,
			fields: [][2]string{{"global_cache_key", "shared"}, {"global_cache", "true"}}}))
		_ = b
		// A cache export is an index of cache blobs, not a runnable image:
		// read its raw manifest.
		if out, err := exec.Command("skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+s.admin,
			"docker://"+s.addr+"/cache/global/shared:cache").CombinedOutput(); err != nil {
			t.Logf("skopeo: %v\n%s\nbuild log:\n%s", err, out, s.logText(admin, b.Id))
			t.Fatalf("admin build did not export cache/global/shared")
		}
		// A tenant's build imports it: its first build is warm from the global tier.
		c := s.token("carl", "tenant-c", "build:read", "build:write")
		warm := mustSucceed(t, s, c, s.build(c, submission{files: df, fields: [][2]string{{"global_cache_key", "shared"}}}))
		if warm.StepsCached == 0 {
			t.Errorf("build importing the global cache had no cached steps:\n%s", s.logText(c, warm.Id))
		}
		// A non-admin token cannot push to the global tier directly either.
		w := s.token("mallory", "m", "image:read", "image:write")
		out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
			"--src-creds", "kiln:"+s.admin, "--dest-creds", "kiln:"+w,
			"docker://"+s.addr+"/base/busybox:latest", "docker://"+s.addr+"/cache/global/shared:cache").CombinedOutput()
		if err == nil {
			t.Errorf("image:write token pushed to cache/global: %s", out)
		}
	})

	t.Run("skopeo pulls a built image with a token of its tenant only", func(t *testing.T) {
		// Another tenant's namespace is not a tenant's to name.
		if code, body := s.submit(writer, submission{files: df, fields: [][2]string{{"tags", "team/app:1.0"}}}); code != http.StatusForbidden {
			t.Errorf("tenant-a tagging team/app:1.0: status %d, want 403: %s", code, body)
		}
		// A one-component name lands in the tenant's namespace.
		b := mustSucceed(t, s, writer, s.build(writer, submission{files: df, fields: [][2]string{{"tags", "app:1.0"}}}))
		if len(b.Tags) != 1 || b.Tags[0] != "tenant-a/app:1.0" {
			t.Fatalf("tags of a tenant-a build named app:1.0 = %v, want [tenant-a/app:1.0]", b.Tags)
		}
		if b.Tenant == nil || *b.Tenant != "tenant-a" {
			t.Errorf("build tenant = %v, want tenant-a", b.Tenant)
		}
		ref := "docker://" + s.addr + "/tenant-a/app:1.0"
		puller := s.token("ci", "tenant-a", "image:read")
		out, err := exec.Command("skopeo", "inspect", "--tls-verify=false", "--creds", "kiln:"+puller, ref).CombinedOutput()
		if err != nil {
			t.Fatalf("skopeo inspect with a same-tenant image:read token: %v\n%s", err, out)
		}
		var info struct{ Digest string }
		json.Unmarshal(out, &info)
		if info.Digest != *b.ImageDigest {
			t.Errorf("pulled digest %s, build digest %s", info.Digest, *b.ImageDigest)
		}
		dir := t.TempDir()
		if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--src-creds", "kiln:"+puller,
			"docker://"+s.addr+"/builds/"+b.Id+":latest", "oci:"+dir+":x").CombinedOutput(); err != nil {
			t.Fatalf("skopeo copy of builds/<id>: %v\n%s", err, out)
		}
		// Another tenant pulls neither the name nor builds/<id>.
		stranger := s.token("eve", "tenant-b", "image:read")
		if skopeoOK("kiln:"+stranger, ref) {
			t.Errorf("tenant-b pulled tenant-a/app:1.0")
		}
		if skopeoOK("kiln:"+stranger, "docker://"+s.addr+"/builds/"+b.Id+":latest") {
			t.Errorf("tenant-b pulled tenant-a's builds/%s", b.Id)
		}
		if !skopeoOK("kiln:"+s.admin, ref) {
			t.Errorf("the admin token cannot pull tenant-a/app:1.0")
		}
		if skopeoOK("", ref) {
			t.Errorf("anonymous pull succeeded")
		}
		if skopeoOK("kiln:not-a-token", ref) {
			t.Errorf("pull with a bogus token succeeded")
		}
		noImage := s.token("x", "tenant-a", "cache:admin")
		if skopeoOK("kiln:"+noImage, ref) {
			t.Errorf("pull with a token lacking image:read succeeded")
		}

		// Images API: a second name shares the digest; removing one keeps
		// the other. The tenant names and finds its images without its
		// namespace; another tenant does not see them.
		owner := s.token("ci", "tenant-a", "image:read", "image:write")
		var tagged api.Image
		s.doJSON(owner, "POST", "/v1/images/app:1.0/tags", map[string]string{"name": "app:stable"}, http.StatusCreated, &tagged)
		if tagged.Digest != *b.ImageDigest || tagged.Name != "tenant-a/app:stable" || tagged.Names == nil || len(*tagged.Names) < 2 {
			t.Errorf("tag: %+v", tagged)
		}
		s.doJSON(owner, "POST", "/v1/images/app:1.0/tags", map[string]string{"name": "team/app:stable"}, http.StatusForbidden, nil)
		s.doJSON(owner, "POST", "/v1/images/app:1.0/tags", map[string]string{"name": "builds/app:stable"}, http.StatusBadRequest, nil)
		wrongTenant := s.token("eve", "tenant-b", "image:read", "image:write")
		s.doJSON(wrongTenant, "POST", "/v1/images/tenant-a%2Fapp:1.0/tags", map[string]string{"name": "app:stolen"}, http.StatusNotFound, nil)
		if !skopeoOK("kiln:"+puller, "docker://"+s.addr+"/tenant-a/app:stable") {
			t.Errorf("new name not pullable")
		}
		s.doJSON(stranger, "GET", "/v1/images/tenant-a%2Fapp:1.0", nil, http.StatusNotFound, nil)
		var theirs api.ImageList
		s.doJSON(stranger, "GET", "/v1/images", nil, http.StatusOK, &theirs)
		for _, im := range theirs.Images {
			if strings.HasPrefix(im.Name, "tenant-a/") {
				t.Errorf("tenant-b's image list shows %s", im.Name)
			}
		}
		var ours api.ImageList
		s.doJSON(puller, "GET", "/v1/images", nil, http.StatusOK, &ours)
		listed := map[string]bool{}
		for _, im := range ours.Images {
			listed[im.Name] = true
		}
		if !listed["tenant-a/app:1.0"] || !listed["tenant-a/app:stable"] || !listed["base/busybox:latest"] {
			t.Errorf("tenant-a's image list lacks its own names or the shared base: %v", listed)
		}
		// A shared name is visible to a tenant but not its to delete.
		resp := s.do(owner, "DELETE", "/v1/images/base%2Fbusybox:latest", nil, "")
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("tenant deleting the shared base: %d, want 403", resp.StatusCode)
		}
		resp = s.do(wrongTenant, "DELETE", "/v1/images/tenant-a%2Fapp:1.0", nil, "")
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("tenant-b deleting tenant-a's image: %d, want 404", resp.StatusCode)
		}
		resp = s.do(owner, "DELETE", "/v1/images/app:1.0", nil, "")
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Errorf("delete image: %d", resp.StatusCode)
		}
		if skopeoOK("kiln:"+puller, ref) {
			t.Errorf("deleted name still pullable")
		}
		if !skopeoOK("kiln:"+puller, "docker://"+s.addr+"/tenant-a/app:stable") {
			t.Errorf("other name of the digest broke after deleting one")
		}
		var im api.Image
		s.doJSON(puller, "GET", "/v1/images/app:stable", nil, http.StatusOK, &im)
		if im.Digest != *b.ImageDigest || im.Name != "tenant-a/app:stable" {
			t.Errorf("GET image: %+v", im)
		}
		s.doJSON(s.admin, "GET", "/v1/images/tenant-a%2Fapp:stable", nil, http.StatusOK, &im)
		if im.Digest != *b.ImageDigest {
			t.Errorf("admin GET image: %+v", im)
		}
	})
}

func skopeoOK(creds, ref string) bool {
	args := []string{"inspect", "--tls-verify=false"}
	if creds != "" {
		args = append(args, "--creds", creds)
	} else {
		args = append(args, "--no-creds")
	}
	return exec.Command("skopeo", append(args, ref)...).Run() == nil
}
