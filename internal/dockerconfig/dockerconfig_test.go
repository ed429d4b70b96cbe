package dockerconfig

import (
	"context"
	"encoding/base64"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The secrets below must never show up in an error.
const (
	secret      = "hunter2-s3cret"
	helperToken = "helper-s3cret"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// writeConfig writes config.json into a fresh DOCKER_CONFIG directory and
// returns its path. DOCKER_AUTH_CONFIG is cleared so the test's
// environment cannot leak in.
func writeConfig(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
	t.Setenv("DOCKER_AUTH_CONFIG", "")
	return path
}

func load(t *testing.T, content string) *Config {
	t.Helper()
	writeConfig(t, content)
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return c
}

func get(t *testing.T, c *Config, host string) (Credentials, bool) {
	t.Helper()
	cred, ok, err := c.Credentials(context.Background(), host)
	if err != nil {
		t.Fatalf("Credentials(%q): %v", host, err)
	}
	return cred, ok
}

func want(t *testing.T, c *Config, host string, wantCred Credentials) {
	t.Helper()
	cred, ok := get(t, c, host)
	if !ok || cred != wantCred {
		t.Errorf("Credentials(%q) = %+v, %v; want %+v, true", host, cred, ok, wantCred)
	}
}

func wantNone(t *testing.T, c *Config, host string) {
	t.Helper()
	if cred, ok := get(t, c, host); ok || cred != (Credentials{}) {
		t.Errorf("Credentials(%q) = %+v, %v; want none", host, cred, ok)
	}
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one containing %q", parts)
	}
	t.Logf("error: %v", err)
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not contain %q", err, p)
		}
	}
	for _, s := range []string{secret, helperToken, b64("user:" + secret)} {
		if strings.Contains(err.Error(), s) {
			t.Errorf("error %q leaks a secret", err)
		}
	}
}

// fakeHelper puts docker-credential-<name>, a shell script, first on PATH.
// It logs each server URL it is asked for to the returned file, then
// answers by that URL.
func fakeHelper(t *testing.T, name string) (log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "asked")
	script := `#!/bin/sh
[ "$1" = get ] || { echo "unexpected action $1" >&2; exit 3; }
url=$(cat)
printf '%s\n' "$url" >> '` + log + `'
case "$url" in
ghcr.io|https://index.docker.io/v1/)
	printf '{"ServerURL":"%s","Username":"helper-user","Secret":"` + helperToken + `"}\n' "$url" ;;
token.example)
	printf '{"ServerURL":"%s","Username":"<token>","Secret":"` + helperToken + `"}\n' "$url" ;;
broken.example)
	echo '{"Username":"helper-user","Secret":"` + helperToken + `"'
	echo "pass store is locked" >&2
	exit 1 ;;
garbage.example)
	echo 'Username=helper-user Secret=` + helperToken + `' ;;
slow.example)
	exec sleep 10 ;;
*)
	echo "credentials not found in native keychain"
	exit 1 ;;
esac
`
	if err := os.WriteFile(filepath.Join(dir, "docker-credential-"+name), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return log
}

func asked(t *testing.T, log string) []string {
	t.Helper()
	b, err := os.ReadFile(log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

func TestAuthField(t *testing.T) {
	c := load(t, `{"auths":{"registry.example.com":{"auth":"`+b64("alice:"+secret)+`"}}}`)
	want(t, c, "registry.example.com", Credentials{"alice", secret})
	want(t, c, "REGISTRY.example.com", Credentials{"alice", secret})
	wantNone(t, c, "other.example.com")
	wantNone(t, c, "registry.example.com:5000")
}

func TestAuthPasswordWithColon(t *testing.T) {
	c := load(t, `{"auths":{"r.example":{"auth":"`+b64("alice:pa:ss")+`"}}}`)
	want(t, c, "r.example", Credentials{"alice", "pa:ss"})
}

func TestUsernamePassword(t *testing.T) {
	c := load(t, `{"auths":{"r.example":{"username":"bob","password":"`+secret+`"}}}`)
	want(t, c, "r.example", Credentials{"bob", secret})
}

func TestAuthWinsOverUsernamePassword(t *testing.T) {
	c := load(t, `{"auths":{"r.example":{"auth":"`+b64("alice:"+secret)+`","username":"bob","password":"other"}}}`)
	want(t, c, "r.example", Credentials{"alice", secret})
}

func TestIdentityToken(t *testing.T) {
	c := load(t, `{"auths":{"r.example":{"auth":"`+b64("00000000-0000-0000-0000-000000000000:")+`","identitytoken":"`+secret+`"}}}`)
	want(t, c, "r.example", Credentials{"", secret})
}

func TestEmptyEntryIsAnonymous(t *testing.T) {
	c := load(t, `{"auths":{"r.example":{},"u.example":{"username":"bob"}}}`)
	wantNone(t, c, "r.example")
	wantNone(t, c, "u.example")
}

func TestKeyForms(t *testing.T) {
	c := load(t, `{"auths":{
		"https://v1.example/v1/":     {"username":"a","password":"1"},
		"port.example:5000":          {"username":"b","password":"2"},
		"http://plain.example:8080/": {"username":"c","password":"3"},
		"https://bare.example":       {"username":"d","password":"4"},
		"path.example/some/repo":     {"username":"e","password":"5"}
	}}`)
	want(t, c, "v1.example", Credentials{"a", "1"})
	want(t, c, "port.example:5000", Credentials{"b", "2"})
	wantNone(t, c, "port.example")
	want(t, c, "plain.example:8080", Credentials{"c", "3"})
	want(t, c, "bare.example", Credentials{"d", "4"})
	want(t, c, "path.example", Credentials{"e", "5"})
	// A host given as a URL or with a repository is reduced the same way.
	want(t, c, "https://port.example:5000/v2/", Credentials{"b", "2"})
}

func TestExactKeyFirst(t *testing.T) {
	c := load(t, `{"auths":{
		"https://r.example/v1/": {"username":"url","password":"1"},
		"r.example":             {"username":"exact","password":"2"}
	}}`)
	want(t, c, "r.example", Credentials{"exact", "2"})
}

func TestDockerHub(t *testing.T) {
	c := load(t, `{"auths":{"https://index.docker.io/v1/":{"auth":"`+b64("hubuser:"+secret)+`"}}}`)
	for _, host := range []string{"docker.io", "index.docker.io", "registry-1.docker.io"} {
		want(t, c, host, Credentials{"hubuser", secret})
	}
	wantNone(t, c, "ghcr.io")
}

func TestDockerHubOtherSpellings(t *testing.T) {
	c := load(t, `{"auths":{"docker.io":{"username":"k8s","password":"`+secret+`"}}}`)
	want(t, c, "docker.io", Credentials{"k8s", secret})
	want(t, c, "registry-1.docker.io", Credentials{"k8s", secret})
}

func TestMissingFile(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", filepath.Join(t.TempDir(), "nowhere"))
	t.Setenv("DOCKER_AUTH_CONFIG", "")
	c, err := Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	wantNone(t, c, "docker.io")

	c, err = LoadFile(filepath.Join(t.TempDir(), "config.json"))
	if err != nil {
		t.Fatalf("LoadFile: %v", err)
	}
	wantNone(t, c, "r.example")
}

func TestEmptyFile(t *testing.T) {
	c := load(t, "")
	wantNone(t, c, "r.example")
}

func TestHomeDefault(t *testing.T) {
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("DOCKER_CONFIG", "")
	t.Setenv("DOCKER_AUTH_CONFIG", "")
	if err := os.Mkdir(filepath.Join(home, ".docker"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".docker", "config.json"), []byte(`{"auths":{"r.example":{"username":"home","password":"x"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	want(t, c, "r.example", Credentials{"home", "x"})
}

func TestDockerConfigHonoured(t *testing.T) {
	// A config under HOME that must be ignored...
	home := t.TempDir()
	t.Setenv("HOME", home)
	if err := os.Mkdir(filepath.Join(home, ".docker"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".docker", "config.json"), []byte(`{"auths":{"r.example":{"username":"home","password":"x"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// ...because DOCKER_CONFIG points elsewhere.
	c := load(t, `{"auths":{"r.example":{"username":"env","password":"y"}}}`)
	want(t, c, "r.example", Credentials{"env", "y"})
}

func TestMalformedJSON(t *testing.T) {
	path := writeConfig(t, "{\n  \"auths\": {\n    \"r.example\": {\"password\": \""+secret+"\" x}\n  }\n}\n")
	_, err := Load()
	wantErr(t, err, path, "not valid JSON", "line 3")

	path = writeConfig(t, `{"auths":{"r.example":{"password":`+"1234"+`}}}`)
	_, err = Load()
	wantErr(t, err, path, "password")
	if strings.Contains(err.Error(), "1234") {
		t.Errorf("error %q quotes the value", err)
	}

	path = writeConfig(t, `{"auths":{"r.example":{"password":"`+secret)
	_, err = Load()
	wantErr(t, err, path)
}

func TestMalformedAuth(t *testing.T) {
	for name, auth := range map[string]string{
		"not base64": "!!" + secret + "!!",
		"no colon":   b64(secret),
		"no user":    b64(":" + secret),
	} {
		t.Run(name, func(t *testing.T) {
			path := writeConfig(t, `{"auths":{"bad.example":{"auth":"`+auth+`"},"good.example":{"username":"a","password":"b"}}}`)
			_, err := Load()
			wantErr(t, err, path, `"bad.example"`, `"auth"`)
			if strings.Contains(err.Error(), auth) {
				t.Errorf("error %q quotes the auth value", err)
			}
		})
	}
}

func TestCredHelpersWin(t *testing.T) {
	log := fakeHelper(t, "fake")
	c := load(t, `{
		"auths": {"ghcr.io": {"username":"file","password":"`+secret+`"}, "r.example": {"username":"file","password":"f"}},
		"credHelpers": {"ghcr.io": "fake"}
	}`)
	want(t, c, "ghcr.io", Credentials{"helper-user", helperToken})
	// Hosts without a credHelpers entry and no credsStore use auths.
	want(t, c, "r.example", Credentials{"file", "f"})
	if got := asked(t, log); strings.Join(got, ",") != "ghcr.io" {
		t.Errorf("helper asked for %q; want only ghcr.io", got)
	}
}

func TestCredHelperBeatsCredsStore(t *testing.T) {
	fakeHelper(t, "fake")
	c := load(t, `{"credsStore": "absent", "credHelpers": {"ghcr.io": "fake"}}`)
	want(t, c, "ghcr.io", Credentials{"helper-user", helperToken})
	// Other hosts go to credsStore, which is not installed.
	_, _, err := c.Credentials(context.Background(), "r.example")
	wantErr(t, err, "docker-credential-absent not found on PATH", `"credsStore"`)
}

func TestEmptyCredHelperMeansFile(t *testing.T) {
	fakeHelper(t, "fake")
	c := load(t, `{"credsStore":"fake","credHelpers":{"r.example":""},"auths":{"r.example":{"username":"file","password":"f"}}}`)
	want(t, c, "r.example", Credentials{"file", "f"})
}

func TestCredsStore(t *testing.T) {
	log := fakeHelper(t, "fake")
	c := load(t, `{"credsStore":"fake","auths":{"ghcr.io":{},"https://index.docker.io/v1/":{}}}`)
	want(t, c, "ghcr.io", Credentials{"helper-user", helperToken})
	want(t, c, "docker.io", Credentials{"helper-user", helperToken})
	want(t, c, "registry-1.docker.io", Credentials{"helper-user", helperToken})
	got := asked(t, log)
	wantAsked := "ghcr.io,https://index.docker.io/v1/,https://index.docker.io/v1/"
	if strings.Join(got, ",") != wantAsked {
		t.Errorf("helper asked for %q; want %s", got, wantAsked)
	}
}

func TestHelperIdentityToken(t *testing.T) {
	fakeHelper(t, "fake")
	c := load(t, `{"credsStore":"fake"}`)
	want(t, c, "token.example", Credentials{"", helperToken})
}

func TestHelperNotFoundIsAnonymous(t *testing.T) {
	fakeHelper(t, "fake")
	// Docker does not fall back to auths once a helper is chosen.
	c := load(t, `{"credsStore":"fake","auths":{"unknown.example":{"username":"file","password":"`+secret+`"}}}`)
	wantNone(t, c, "unknown.example")

	c = load(t, `{"credHelpers":{"unknown.example":"fake"},"auths":{"unknown.example":{"username":"file","password":"`+secret+`"}}}`)
	wantNone(t, c, "unknown.example")
}

func TestHelperMissingFromPath(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	path := writeConfig(t, `{"credsStore":"pass"}`)
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	_, ok, err := c.Credentials(context.Background(), "ghcr.io")
	wantErr(t, err, "docker-credential-pass not found on PATH: install it or remove \"credsStore\" from "+path)
	if ok || !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("ok = %v, errors.Is(err, exec.ErrNotFound) = %v", ok, errors.Is(err, exec.ErrNotFound))
	}

	c = load(t, `{"credHelpers":{"ghcr.io":"gcloud"}}`)
	_, _, err = c.Credentials(context.Background(), "ghcr.io")
	wantErr(t, err, "docker-credential-gcloud not found on PATH", `credHelpers["ghcr.io"]`)
}

func TestHelperFailure(t *testing.T) {
	fakeHelper(t, "fake")
	c := load(t, `{"credsStore":"fake"}`)
	_, ok, err := c.Credentials(context.Background(), "broken.example")
	wantErr(t, err, "docker-credential-fake get for broken.example failed", "exit status 1", "pass store is locked", `"credsStore"`)
	if ok {
		t.Error("ok with an error")
	}

	_, _, err = c.Credentials(context.Background(), "garbage.example")
	wantErr(t, err, "docker-credential-fake get for garbage.example", "JSON")
}

func TestHelperBadName(t *testing.T) {
	c := load(t, `{"credsStore":"../../bin/sh"}`)
	_, _, err := c.Credentials(context.Background(), "r.example")
	wantErr(t, err, "not a credential helper name")
}

func TestHelperTimeout(t *testing.T) {
	fakeHelper(t, "fake")
	old := helperTimeout
	helperTimeout = 200 * time.Millisecond
	t.Cleanup(func() { helperTimeout = old })
	c := load(t, `{"credsStore":"fake"}`)
	start := time.Now()
	_, _, err := c.Credentials(context.Background(), "slow.example")
	wantErr(t, err, "did not answer within 200ms")
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
}

func TestHelperContextCancelled(t *testing.T) {
	fakeHelper(t, "fake")
	c := load(t, `{"credsStore":"fake"}`)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(100 * time.Millisecond); cancel() }()
	_, _, err := c.Credentials(ctx, "slow.example")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v; want context.Canceled", err)
	}
}

func TestDockerAuthConfig(t *testing.T) {
	log := fakeHelper(t, "fake")
	writeConfig(t, `{"credsStore":"fake","auths":{"r.example":{"username":"file","password":"f"}}}`)
	t.Setenv("DOCKER_AUTH_CONFIG", `{"auths":{"ghcr.io":{"auth":"`+b64("envuser:"+secret)+`"}}}`)
	c, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	want(t, c, "ghcr.io", Credentials{"envuser", secret})
	if got := asked(t, log); len(got) != 0 {
		t.Errorf("helper asked for %q; DOCKER_AUTH_CONFIG should win", got)
	}
	// Hosts it does not name fall through to the file's rules.
	want(t, c, "token.example", Credentials{"", helperToken})

	// LoadFile is the file alone.
	c, err = LoadFile(filepath.Join(os.Getenv("DOCKER_CONFIG"), "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	want(t, c, "ghcr.io", Credentials{"helper-user", helperToken})
}

func TestDockerAuthConfigMalformed(t *testing.T) {
	writeConfig(t, `{}`)
	for _, v := range []string{
		`{"auths":{"ghcr.io":{"auth":"` + b64(secret) + `"}}}`,
		`{"auths":{"ghcr.io":{"username":"u","password":"` + secret + `"}}}`,
		`{"auths":{"ghcr.io":{"auth":"` + secret,
	} {
		t.Setenv("DOCKER_AUTH_CONFIG", v)
		_, err := Load()
		wantErr(t, err, "DOCKER_AUTH_CONFIG")
	}
}

func TestNoHost(t *testing.T) {
	c := load(t, `{}`)
	if _, _, err := c.Credentials(context.Background(), ""); err == nil {
		t.Error("no error for an empty host")
	}
}
