package server_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/api"
)

// A short build id resolves only among the caller's own builds.
func TestListBuildsByIDPrefixIsTenantScoped(t *testing.T) {
	k := startKiln(t)
	a, b := k.token("tenant-a", "build:write"), k.token("tenant-b", "build:write")
	ba := k.build(a)
	bb := k.build(b, [2]string{"build_args", `{"X":"1"}`})

	var list api.BuildList
	k.json(a, "GET", "/v1/builds?id_prefix="+ba.Id[:20], nil, http.StatusOK, &list)
	if len(list.Builds) != 1 || list.Builds[0].Id != ba.Id {
		t.Errorf("tenant-a's prefix %s finds %v, want %s", ba.Id[:20], buildIDs(list.Builds), ba.Id)
	}
	k.json(b, "GET", "/v1/builds?id_prefix="+ba.Id[:20], nil, http.StatusOK, &list)
	if len(list.Builds) != 0 {
		t.Errorf("tenant-b finds tenant-a's build by prefix: %v", buildIDs(list.Builds))
	}
	// Every id starts with b: the admin sees both, a tenant its own.
	k.json(k.admin, "GET", "/v1/builds?id_prefix=b", nil, http.StatusOK, &list)
	if got := buildIDs(list.Builds); !slices.Contains(got, ba.Id) || !slices.Contains(got, bb.Id) {
		t.Errorf("the admin's prefix b finds %v", got)
	}
	k.json(a, "GET", "/v1/builds?id_prefix=b", nil, http.StatusOK, &list)
	if got := buildIDs(list.Builds); !slices.Equal(got, []string{ba.Id}) {
		t.Errorf("tenant-a's prefix b finds %v", got)
	}
	k.json(a, "GET", "/v1/builds?id_prefix="+ba.Id, nil, http.StatusOK, &list)
	if len(list.Builds) != 1 {
		t.Errorf("a whole id as prefix finds %v", buildIDs(list.Builds))
	}
	for _, bad := range []string{"B0", "b%25", "b_", "", strings.Repeat("b", 28)} {
		if code, body := k.call(a, "GET", "/v1/builds?id_prefix="+bad, nil, ""); code != http.StatusBadRequest {
			t.Errorf("id_prefix %q: %d %s, want 400", bad, code, body)
		}
	}
}

func buildIDs(list []api.Build) []string {
	var out []string
	for _, b := range list {
		out = append(out, b.Id)
	}
	return out
}

// A build names its image only once it has one.
func TestBuildImageOnlyOnceSucceeded(t *testing.T) {
	k := startKiln(t)
	ok := k.build(k.admin)
	if ok.Image != "builds/"+ok.Id+":latest" {
		t.Errorf("succeeded build's image is %q", ok.Image)
	}
	held := k.build(k.admin, [2]string{"build_args", `{"HOLD":"1"}`})
	var b api.Build
	k.json(k.admin, "POST", "/v1/builds/"+held.Id+"/cancel", nil, http.StatusOK, &b)
	code, body := k.call(k.admin, "GET", "/v1/builds/"+held.Id, nil, "")
	var raw map[string]any
	if err := json.Unmarshal(body, &raw); code != http.StatusOK || err != nil {
		t.Fatalf("get canceled build: %d %s", code, body)
	}
	if raw["status"] != "canceled" {
		t.Fatalf("build %s is %v", held.Id, raw["status"])
	}
	if im, has := raw["image"]; has {
		t.Errorf("a canceled build names image %v", im)
	}
}

// images list: sizes from the manifests, per-build names hidden on
// request, filters by prefix and glob, a tenant's short names.
func TestListImagesFiltersAndSizes(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write", "image:write")
	ba := k.build(a, [2]string{"tags", "app:1"})
	k.build(a, [2]string{"tags", "web:2"}, [2]string{"build_args", `{"X":"1"}`})
	k.build(k.admin, [2]string{"tags", "tenant-b/app:1"}, [2]string{"build_args", `{"X":"2"}`})

	list := func(tok, query string) []api.Image {
		t.Helper()
		var l api.ImageList
		k.json(tok, "GET", "/v1/images"+query, nil, http.StatusOK, &l)
		return l.Images
	}
	all := list(a, "")
	if !slices.Contains(names(all), "builds/"+ba.Id+":latest") {
		t.Errorf("the default list lacks the per-build name: %v", names(all))
	}
	// The fake runtime pushes newImage(build id) for each build.
	for _, im := range all {
		if im.BuildId == nil {
			t.Errorf("%s names no build", im.Name)
			continue
		}
		img := newImage(*im.BuildId)
		want := int64(len(img.Config) + len(img.Layer))
		if im.Size == nil || *im.Size != want {
			t.Errorf("%s has size %v, want %d", im.Name, deref(im.Size), want)
		}
	}
	if got := names(list(a, "?include_builds=false")); !slices.Equal(got, []string{"tenant-a/app:1", "tenant-a/web:2"}) {
		t.Errorf("without builds tenant-a lists %v", got)
	}
	for q, want := range map[string][]string{
		"app":          {"tenant-a/app:1"},
		"tenant-a/":    {"tenant-a/app:1", "tenant-a/web:2"},
		"tenant-a/*":   {"tenant-a/app:1", "tenant-a/web:2"},
		"*/app":        {"tenant-a/app:1"},
		"web:*":        {"tenant-a/web:2"},
		"tenant-a/w?b": {"tenant-a/web:2"},
		"nothing":      nil,
	} {
		if got := names(list(a, "?include_builds=false&filter="+url.QueryEscape(q))); !slices.Equal(got, want) {
			t.Errorf("tenant-a filter %q lists %v, want %v", q, got, want)
		}
	}
	if got := names(list(k.admin, "?include_builds=false&filter=*/app")); !slices.Equal(got, []string{"tenant-a/app:1", "tenant-b/app:1"}) {
		t.Errorf("the admin's filter */app lists %v", got)
	}
	if code, body := k.call(a, "GET", "/v1/images?filter=%5B", nil, ""); code != http.StatusBadRequest {
		t.Errorf("a bad glob: %d %s, want 400", code, body)
	}
	if code, body := k.call(a, "GET", "/v1/images?include_builds=maybe", nil, ""); code != http.StatusBadRequest {
		t.Errorf("include_builds=maybe: %d %s, want 400", code, body)
	}
}

func TestVersionEndpoint(t *testing.T) {
	k := startKiln(t)
	tok := k.token("tenant-a", "build:read")
	var v api.ServerVersion
	k.json(tok, "GET", "/v1/version", nil, http.StatusOK, &v)
	if v.Version == "" || v.Buildkit == "" || v.GoVersion == "" || v.Runtime != "fake" || v.BuilderImage != nil {
		t.Errorf("version: %+v", v)
	}
}

func deref[T any](p *T) (v T) {
	if p != nil {
		v = *p
	}
	return v
}
