package test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln build --allow grants RUN steps an insecure entitlement only where
// the operator allows it (builds.entitlements): refused by default, and
// on a server that allows security.insecure a privileged step gets every
// capability, while the same step without --allow fails.
func TestAllowEntitlements(t *testing.T) {
	s := startServer(t, withArgs("--builds-entitlements", "security.insecure"))
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nRUN --security=insecure grep CapEff /proc/self/status > /caps\n", base),
	})
	out := t.TempDir()
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "--allow", "security.insecure", "-o", "type=local,dest="+out, dir); code != 0 {
		t.Fatalf("--allow security.insecure: exit %d\n%s", code, stderr)
	}
	if caps := readOut(t, filepath.Join(out, "caps")); !strings.Contains(caps, "000001ff") && !strings.Contains(caps, "0000003f") {
		t.Errorf("a privileged step has %q, want every capability", strings.TrimSpace(caps))
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", dir); code != 1 || !strings.Contains(stderr, "security.insecure") {
		t.Errorf("RUN --security=insecure without --allow: exit %d, want a failed build naming the entitlement\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--allow", "network.host", dir); code != 1 || !strings.Contains(stderr, "builds.entitlements") {
		t.Errorf("--allow of an entitlement the server does not allow: exit %d\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--allow", "device", dir); code != 2 || !strings.Contains(stderr, "network.host or security.insecure") {
		t.Errorf("--allow device: exit %d, want a usage error\n%s", code, stderr)
	}
}
