package test

import (
	"fmt"
	"net/http"
	"testing"
)

// A name in kiln's own host form, as FROM needs it, names kiln's
// registry; another registry's host is refused with a clear error.
func TestTagInKilnsOwnHostForm(t *testing.T) {
	s := startServer(t)
	files := map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo host-form\n", s.base())}
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: files,
		fields: [][2]string{{"tags", s.addr + "/hostform/app:1"}}}))
	if len(b.Tags) != 1 || b.Tags[0] != "hostform/app:1" {
		t.Errorf("tags %v, want [hostform/app:1]", b.Tags)
	}
	s.doJSON(s.admin, "GET", "/v1/images/hostform/app:1", nil, http.StatusOK, nil)
	code, body := s.submit(s.admin, submission{files: files, fields: [][2]string{{"tags", "ghcr.io/hostform/app:1"}}})
	if code != http.StatusBadRequest {
		t.Errorf("a name on another registry: %d %s, want 400", code, body)
	}
}
