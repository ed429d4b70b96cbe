package images

import "testing"

func TestMatch(t *testing.T) {
	for _, c := range []struct {
		filter, tenant, repo, tag string
		want                      bool
	}{
		{"", "", "team-a/app", "1", true},
		{"team-a/", "", "team-a/app", "1", true},
		{"team-a", "", "team-a-other/app", "1", true}, // a plain prefix of the name
		{"team-a/app:1", "", "team-a/app", "1", true},
		{"team-a/app:2", "", "team-a/app", "1", false},
		{"team-a/*", "", "team-a/app", "1", true},
		{"team-a/*", "", "team-a/x/app", "1", false}, // * stops at /
		{"team-a/*", "", "team-b/app", "1", false},
		{"*/app", "", "team-b/app", "1", true},
		{"app:v1.*", "", "app", "v1.2", true},
		{"app:v1.*", "", "app", "v2.0", false},
		{"app", "team-a", "team-a/app", "1", true}, // a tenant's short name
		{"app", "team-a", "team-b/app", "1", false},
		{"app*", "team-a", "team-a/apple", "1", true},
		{"app", "", "team-a/app", "1", false},
	} {
		if got := Match(c.filter, c.tenant, c.repo, c.tag); got != c.want {
			t.Errorf("Match(%q, tenant %q, %s:%s) = %v, want %v", c.filter, c.tenant, c.repo, c.tag, got, c.want)
		}
	}
	if ValidFilter("[") == nil || ValidFilter("team-a/*") != nil || ValidFilter("") != nil {
		t.Error("ValidFilter")
	}
}
