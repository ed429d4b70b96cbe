package vm

import (
	"reflect"
	"testing"

	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// Every registry a build names becomes one guest listener: loopback IPs
// as they are, host names on loopback IPs of their own that the guest's
// hosts file maps them to, localhost and 127.0.0.1 on one port as one.
func TestRegistryTunnelsNameEveryRegistryOnce(t *testing.T) {
	got, err := registryTunnels(runtime.Job{
		InsecureRegistries: []string{"127.0.0.1:7070", "kiln.example.com:7070"},
		Solve: solve.Request{
			Push:          []string{"kiln.example.com:7070/app:1", "localhost:7070/app:1"},
			CacheImports:  []string{"cache.example.com:5000/cache/x:latest"},
			NamedContexts: map[string]string{"context:busybox": "docker-image://127.0.0.1:7070/mirror/busybox@sha256:" + sha},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []guest.Tunnel{
		{Name: "registry", Listen: "127.0.0.1:7070"},
		{Name: "registry", Listen: "127.0.1.1:5000", Host: "cache.example.com"},
		{Name: "registry", Listen: "127.0.1.2:7070", Host: "kiln.example.com"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("tunnels:\n got %+v\nwant %+v", got, want)
	}
}

const sha = "0000000000000000000000000000000000000000000000000000000000000000"
