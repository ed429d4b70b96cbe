package server_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/config"
)

// apiError decodes an error answer, which is always {"error", "code"}.
func apiError(t *testing.T, what string, body []byte) (code, msg string) {
	t.Helper()
	var e map[string]string
	if err := json.Unmarshal(body, &e); err != nil || len(e) != 2 || e["error"] == "" || e["code"] == "" {
		t.Fatalf("%s: body %s is not {\"error\", \"code\"} (%v)", what, body, err)
	}
	return e["code"], e["error"]
}

// Refused submissions answer 400 naming the field, and record nothing.
func TestRefusedSubmissionsNameTheFieldAndRecordNothing(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.CPUsMax = 2 })
	for _, c := range []struct {
		fields [][2]string
		status int
		code   string
		want   string
	}{
		{[][2]string{{"cpus", "64"}}, 400, "bad_request", "cpus=64 is over the cap"},
		{[][2]string{{"cpus", "many"}}, 400, "bad_request", "cpus"},
		{[][2]string{{"network", "host"}}, 400, "bad_request", "network"},
		{[][2]string{{"build_args", `{"1x":"y"}`}}, 400, "bad_request", `build arg name "1x"`},
		{[][2]string{{"build_args", `[1]`}}, 400, "bad_request", "build_args"},
		{[][2]string{{"target", "nope"}}, 400, "bad_request", `target "nope" not found`},
		{[][2]string{{"call", "lint"}}, 400, "bad_request", "call"},
		{[][2]string{{"colour", "blue"}}, 400, "bad_request", `unknown field "colour"`},
		{[][2]string{{"cache_scope", "someone-else"}}, 403, "forbidden", "cache_scope"},
		{[][2]string{{"global_cache", "true"}, {"global_cache_key", "Bad Key"}}, 400, "bad_request", "global_cache_key"},
	} {
		body, ct := submission(c.fields...)
		status, resp := k.call(k.admin, "POST", "/v1/builds", body, ct)
		code, msg := apiError(t, fmt.Sprint(c.fields), resp)
		if status != c.status || code != c.code || !strings.Contains(msg, c.want) {
			t.Errorf("%v: %d %s %q, want %d %s naming %q", c.fields, status, code, msg, c.status, c.code, c.want)
		}
	}
	var list api.BuildList
	k.json(k.admin, "GET", "/v1/builds", nil, http.StatusOK, &list)
	if len(list.Builds) != 0 {
		t.Errorf("refused submissions recorded %d builds", len(list.Builds))
	}
}

// Each part's errors reach the client with their status and code.
func TestErrorsReachTheClientClassified(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.ContextMaxBytes = 64 << 10 })
	check := func(what string, status int, resp []byte, wantStatus int, wantCode, wantMsg string) {
		t.Helper()
		code, msg := apiError(t, what, resp)
		if status != wantStatus || code != wantCode || !strings.Contains(msg, wantMsg) {
			t.Errorf("%s: %d %s %q, want %d %s with %q", what, status, code, msg, wantStatus, wantCode, wantMsg)
		}
	}
	upload := func(context []byte, fields ...[2]string) (int, []byte) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		for _, f := range fields {
			mw.WriteField(f[0], f[1])
		}
		w, _ := mw.CreateFormFile("context", "context.tar")
		w.Write(context)
		mw.Close()
		return k.call(k.admin, "POST", "/v1/builds", &buf, mw.FormDataContentType())
	}

	// buildcontext
	status, resp := upload([]byte("this is not a tar, not even close to one"))
	check("garbage context", status, resp, 400, "bad_request", "is not a valid")
	status, resp = upload(bytes.Repeat([]byte{0}, 128<<10))
	check("context over context.max_bytes", status, resp, 413, "too_large", "context.max_bytes")

	// builds and store
	status, resp = k.call(k.admin, "GET", "/v1/builds/b0000000000000000000000000", nil, "")
	check("unknown build", status, resp, 404, "not_found", "no build")
	status, resp = k.call(k.admin, "GET", "/v1/builds?status=done", nil, "")
	check("bad list filter", status, resp, 400, "bad_request", "unknown status")

	// auth: a token without the scope, and a bad token
	reader := k.token("team-r", "build:read")
	body, ct := submission()
	status, resp = k.call(reader, "POST", "/v1/builds", body, ct)
	check("no build:write", status, resp, 403, "forbidden", "build:write")
	status, resp = k.call("not-a-token", "GET", "/v1/builds", nil, "")
	check("bad token", status, resp, 401, "invalid_token", "invalid token")

	// cachevol: nothing there, then held by a running build
	status, resp = k.call(k.admin, "DELETE", "/v1/cache/never-was", nil, "")
	check("no cache volume", status, resp, 404, "not_found", "cache volume not found")
	held := k.build(k.admin, [2]string{"build_args", `{"HOLD":"1"}`})
	status, resp = k.call(k.admin, "DELETE", "/v1/cache/admin", nil, "")
	check("cache volume in use", status, resp, 409, "in_use", "a build is using it")

	// Cancel: while running it ends the build; after, 409 with the
	// final state (the build, not an error).
	var b api.Build
	k.json(k.admin, "POST", "/v1/builds/"+held.Id+"/cancel", nil, http.StatusOK, &b)
	if b.Status != api.BuildStatusCanceled {
		t.Errorf("cancel while running: %s", b.Status)
	}
	k.json(k.admin, "POST", "/v1/builds/"+held.Id+"/cancel", nil, http.StatusConflict, &b)
	if b.Status != api.BuildStatusCanceled {
		t.Errorf("cancel after the end answered %s, want the final state", b.Status)
	}

	// mirror: a base image on a registry that fails, or has no such image.
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/missing/") {
			http.Error(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`, http.StatusNotFound)
			return
		}
		http.Error(w, "down for maintenance", http.StatusInternalServerError)
	}))
	defer broken.Close()
	host := strings.TrimPrefix(broken.URL, "http://")
	body, ct = submission([2]string{"dockerfile", "FROM " + host + "/app:1\n"})
	status, resp = k.call(k.admin, "POST", "/v1/builds", body, ct)
	check("base image upstream fails", status, resp, 502, "upstream", "could not be resolved")
	body, ct = submission([2]string{"dockerfile", "FROM " + host + "/missing/app:1\n"})
	status, resp = k.call(k.admin, "POST", "/v1/builds", body, ct)
	check("base image not upstream", status, resp, 400, "bad_request", "was not found in its registry")
}
