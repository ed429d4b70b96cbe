package server

import (
	"encoding/json"
	"net/http"

	"github.com/kiln-build/kiln/api"
)

func (s *Server) listBuilders(w http.ResponseWriter, r *http.Request) {
	out := api.BuilderList{Builders: []api.Builder{}}
	for _, b := range s.builders.List() {
		out.Builders = append(out.Builders, api.Builder{Scope: b.Scope, Runtime: b.Runtime, State: api.BuilderState(b.State),
			Started: b.Started, LastUsed: b.LastUsed, MemoryMb: b.MemoryMB, Builds: b.Builds})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) stopBuilder(w http.ResponseWriter, r *http.Request) {
	var req api.StopBuilderRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil || req.Scope == "" {
		writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"scope": "<cache scope>"}; kiln builders ls lists them`)
		return
	}
	running, err := s.builders.Stop(req.Scope)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if running {
		w.WriteHeader(http.StatusAccepted)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
