package test

import (
	"net/http"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// conversions counts digests converted to a root filesystem.
func (s *server) conversions() int { return s.metric("kiln_rootfs_conversions_total") }

func (s *server) waitRootFS(name string) api.Image {
	s.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var im api.Image
		s.doJSON(s.admin, "GET", "/v1/images/"+name, nil, http.StatusOK, &im)
		if im.Rootfs != nil && (im.Rootfs.Status == api.RootFSStatusReady || im.Rootfs.Status == api.RootFSStatusFailed) {
			return im
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("rootfs of %s still %+v", name, im.Rootfs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A digest converts to a bootable root filesystem once, however many
// names, tags or deduplicated builds point at it.
func TestDigestConvertsOnce(t *testing.T) {
	s := startServer(t)
	files := map[string]string{"Dockerfile": "FROM scratch\nCOPY a /a\n", "a": "content"}
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: files, fields: [][2]string{{"tags", "conv/app:1"}}}))
	im := s.waitRootFS("conv%2Fapp:1")
	if im.Rootfs.Status != api.RootFSStatusReady || im.Rootfs.Size == nil || *im.Rootfs.Size == 0 {
		t.Fatalf("rootfs: %+v", im.Rootfs)
	}
	if im.Size == nil || *im.Size == 0 || im.Digest != *b.ImageDigest {
		t.Errorf("image: %+v", im)
	}
	n := s.conversions()

	// A second name, and an identical (deduplicated) build with a third.
	s.doJSON(s.admin, "POST", "/v1/images/conv%2Fapp:1/tags", map[string]string{"name": "conv/app:2"}, http.StatusCreated, nil)
	dup := s.build(s.admin, submission{files: files, fields: [][2]string{{"tags", "conv/app:3"}}})
	if dup.DedupOf == nil {
		t.Fatalf("identical build was not deduplicated")
	}
	for _, name := range []string{"conv%2Fapp:2", "conv%2Fapp:3"} {
		if got := s.waitRootFS(name); got.Rootfs.Status != api.RootFSStatusReady || got.Names == nil || len(*got.Names) < 3 {
			t.Errorf("%s: %+v names %v", name, got.Rootfs, got.Names)
		}
	}
	time.Sleep(500 * time.Millisecond)
	if got := s.conversions(); got != n {
		t.Errorf("conversions went from %d to %d after adding names to a converted digest", n, got)
	}
}
