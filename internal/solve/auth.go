package solve

import (
	"context"

	"github.com/moby/buildkit/session/auth"
	"google.golang.org/grpc"
)

// memoryAuth answers buildkitd's credential requests from memory.
//
// BuildKit's own authprovider insists on a token-seed file under the docker
// config dir, which the guest VM may not have and which we do not want on
// disk. Leaving GetTokenAuthority unimplemented makes buildkitd ask for plain
// credentials and run the registry token dance itself, so Credentials is the
// only call we have to answer.
type memoryAuth struct {
	auth.UnimplementedAuthServer
	creds map[string]Credentials
}

func newMemoryAuth(creds map[string]Credentials) *memoryAuth {
	m := make(map[string]Credentials, len(creds))
	for host, c := range creds {
		m[normalizeRegistryHost(host)] = c
	}
	return &memoryAuth{creds: m}
}

func (a *memoryAuth) Register(s *grpc.Server) { auth.RegisterAuthServer(s, a) }

func (a *memoryAuth) Credentials(_ context.Context, req *auth.CredentialsRequest) (*auth.CredentialsResponse, error) {
	c, ok := a.creds[normalizeRegistryHost(req.Host)]
	if !ok {
		// An empty answer means anonymous access, which is what an
		// unconfigured registry should get.
		return &auth.CredentialsResponse{}, nil
	}
	return &auth.CredentialsResponse{Username: c.Username, Secret: c.Password}, nil
}

// normalizeRegistryHost maps the names users write for Docker Hub to the host
// buildkitd actually contacts.
func normalizeRegistryHost(host string) string {
	switch host {
	case "docker.io", "index.docker.io", "https://index.docker.io/v1/":
		return "registry-1.docker.io"
	}
	return host
}
