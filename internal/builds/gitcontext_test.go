package builds

import "testing"

func TestGitHostAndAllowedDomains(t *testing.T) {
	for remote, want := range map[string]string{
		"https://git.example.com/org/r.git":       "git.example.com",
		"https://user@git.example.com:8443/r.git": "git.example.com",
		"http://127.0.0.1:9418/r.git":             "127.0.0.1",
		"ssh://git@host.example/org/r.git":        "host.example",
		"git@github.com:org/r.git":                "github.com",
	} {
		if got := gitHost(remote); got != want {
			t.Errorf("gitHost(%q) = %q, want %q", remote, got, want)
		}
	}
	allowed := []string{"example.com", "*.corp.example"}
	for host, want := range map[string]bool{
		"example.com": true, "EXAMPLE.com.": true, "git.example.com": false,
		"git.corp.example": true, "corp.example": false, "evil.com": false,
	} {
		if got := domainAllowed(host, allowed); got != want {
			t.Errorf("domainAllowed(%q) = %v, want %v", host, got, want)
		}
	}
}
