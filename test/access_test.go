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

	t.Run("skopeo pulls a built image with a token", func(t *testing.T) {
		b := mustSucceed(t, s, writer, s.build(writer, submission{files: df, fields: [][2]string{{"tags", "team/app:1.0"}}}))
		puller := s.token("ci", "", "image:read")
		out, err := exec.Command("skopeo", "inspect", "--tls-verify=false", "--creds", "kiln:"+puller,
			"docker://"+s.addr+"/team/app:1.0").CombinedOutput()
		if err != nil {
			t.Fatalf("skopeo inspect with an image:read token: %v\n%s", err, out)
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
		if skopeoOK("", "docker://"+s.addr+"/team/app:1.0") {
			t.Errorf("anonymous pull succeeded")
		}
		if skopeoOK("kiln:not-a-token", "docker://"+s.addr+"/team/app:1.0") {
			t.Errorf("pull with a bogus token succeeded")
		}
		noImage := s.token("x", "", "cache:admin")
		if skopeoOK("kiln:"+noImage, "docker://"+s.addr+"/team/app:1.0") {
			t.Errorf("pull with a token lacking image:read succeeded")
		}

		// Images API: a second name shares the digest; removing one keeps the other.
		var tagged api.Image
		s.doJSON(s.admin, "POST", "/v1/images/team%2Fapp:1.0/tags", map[string]string{"name": "team/app:stable"}, http.StatusCreated, &tagged)
		if tagged.Digest != *b.ImageDigest || tagged.Names == nil || len(*tagged.Names) < 2 {
			t.Errorf("tag: %+v", tagged)
		}
		if !skopeoOK("kiln:"+puller, "docker://"+s.addr+"/team/app:stable") {
			t.Errorf("new name not pullable")
		}
		resp := s.do(s.admin, "DELETE", "/v1/images/team%2Fapp:1.0", nil, "")
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Errorf("delete image: %d", resp.StatusCode)
		}
		if skopeoOK("kiln:"+puller, "docker://"+s.addr+"/team/app:1.0") {
			t.Errorf("deleted name still pullable")
		}
		if !skopeoOK("kiln:"+puller, "docker://"+s.addr+"/team/app:stable") {
			t.Errorf("other name of the digest broke after deleting one")
		}
		var im api.Image
		s.doJSON(s.admin, "GET", "/v1/images/team%2Fapp:stable", nil, http.StatusOK, &im)
		if im.Digest != *b.ImageDigest {
			t.Errorf("GET image: %+v", im)
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
