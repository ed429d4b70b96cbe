package server

import (
	"encoding/json"
	"mime"
	"net/http"

	"github.com/kiln-build/kiln/api"
)

// maxQueryBytes bounds a blob query: a million digests of 71 bytes.
const maxQueryBytes = 80 << 20

func (s *Server) queryBlobs(w http.ResponseWriter, r *http.Request) {
	var req api.BlobQuery
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxQueryBytes)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"digests": ["sha256:<hex>", ...]}`)
		return
	}
	missing, err := s.builds.MissingBlobs(principal(r), req.Digests)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, api.BlobQueryResult{Missing: missing})
}

// putBlobs stores a tar of blobs; it is an upload like a build's context
// and shares the upload slots.
func (s *Server) putBlobs(w http.ResponseWriter, r *http.Request) {
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct != "application/x-tar" {
		writeError(w, http.StatusBadRequest, "bad_request", "POST /v1/contexts/blobs takes application/x-tar: a tar of files named sha256:<hex>")
		return
	}
	release, ok := s.uploadSlot(w, r)
	if !ok {
		return
	}
	defer release()
	st, err := s.builds.PutBlobs(r.Context(), principal(r), r.Body)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, api.BlobUploadResult{Stored: st.Stored, Bytes: st.Bytes})
}
