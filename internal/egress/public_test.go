package egress

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// A name allowed by a wildcard may lead only to the public internet:
// DialPublic checks the address it actually connects to, CheckPublic
// every address a name resolves to, and both refuse the server's own
// networks as forbidden, saying how to allow them.
func TestPublicOnlyRefusesTheServersOwnNetworks(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	ctx := context.Background()
	for _, addr := range []string{ln.Addr().String(), "localhost:" + port} {
		c, err := DialPublic(ctx, addr)
		if c != nil {
			c.Close()
		}
		if !errors.Is(err, errdefs.ErrForbidden) {
			t.Errorf("DialPublic(%s): %v, want forbidden", addr, err)
		}
	}
	for _, host := range []string{"localhost", "127.0.0.1", "169.254.169.254", "10.1.2.3", "::1", "fd00::1"} {
		err := CheckPublic(ctx, host)
		if !errors.Is(err, errdefs.ErrForbidden) {
			t.Errorf("CheckPublic(%s): %v, want forbidden", host, err)
		}
	}
	if err := CheckPublic(ctx, "93.184.215.14"); err != nil {
		t.Errorf("a public address: %v", err)
	}
	if err := PublicOnly("tcp4", "93.184.215.14:443", nil); err != nil {
		t.Errorf("PublicOnly of a public address: %v", err)
	}
	if err := PublicOnly("tcp4", "10.0.0.5:443", nil); err == nil || !errors.Is(err, errdefs.ErrForbidden) {
		t.Errorf("PublicOnly of a private address: %v", err)
	}
}
