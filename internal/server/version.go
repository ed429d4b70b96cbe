package server

import (
	"net/http"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/version"
)

// version answers GET /v1/version: the server binary's version, the
// BuildKit it runs builds with, and what runs them (the runtime, and the
// builder VM image for the vm runtime), so a client can say exactly which
// server built an image.
func (s *Server) version(w http.ResponseWriter, r *http.Request) {
	v := version.Get()
	out := api.ServerVersion{Version: v.Version, GoVersion: v.GoVersion, Os: v.OS, Arch: v.Arch, Buildkit: v.BuildKit}
	if v.Commit != "" {
		out.Commit = &v.Commit
	}
	if s.builds != nil {
		out.Runtime = s.builds.RuntimeName()
	}
	if s.builderImage != "" {
		out.BuilderImage = &s.builderImage
	}
	writeJSON(w, http.StatusOK, out)
}
