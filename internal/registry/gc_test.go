package registry_test

import (
	"context"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/kiln-build/kiln/internal/testkit"
)

// TestGCRemovesUploadsOfEarlierProcess leaves a partial upload behind as a
// crash would, restarts the registry over the same storage and checks that
// GC deletes it, while an upload begun after the restart survives GC and
// can still be finished; on every storage driver.
func TestGCRemovesUploadsOfEarlierProcess(t *testing.T) {
	const repo = "gc/partial"
	forEachStorage(t, func(t *testing.T, b backend) {
		before := b.start(t)
		startUpload(t, before, repo, []byte("abandoned "))
		if got := uploads(t, before, repo); len(got) != 1 {
			t.Fatalf("_uploads holds %v after one started upload, want one session", got)
		}
		// Uploads record their start in whole seconds: restart in a later
		// second, as a real restart would be.
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))

		after := b.restart(t, before)
		st, err := after.Registry.GC(context.Background())
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
		if st.UploadsRemoved < 1 {
			t.Errorf("GC removed %d uploads, want the abandoned one", st.UploadsRemoved)
		}
		if got := uploads(t, after, repo); len(got) != 0 {
			t.Errorf("_uploads holds %v after GC, want the abandoned session gone", got)
		}

		// An upload of the running registry is left alone, and finishes.
		loc := startUpload(t, after, repo, []byte("hello "))
		st, err = after.Registry.GC(context.Background())
		if err != nil {
			t.Fatalf("second GC: %v", err)
		}
		if st.UploadsRemoved != 0 {
			t.Errorf("second GC removed %d uploads, want 0", st.UploadsRemoved)
		}
		if got := uploads(t, after, repo); len(got) != 1 {
			t.Errorf("_uploads holds %v after the second GC, want the live session", got)
		}
		q := loc.Query()
		q.Set("digest", digest.FromString("hello world").String())
		loc.RawQuery = q.Encode()
		after.Do(t, repo, http.MethodPut, loc.String(), "application/octet-stream", []byte("world"), http.StatusCreated)
		if !b.stored(t, blobData(digest.FromString("hello world"))) {
			t.Errorf("the finished upload's blob is not in the %s store", b.name)
		}
	})
}

// startUpload begins a blob upload to repo, sends data and leaves the
// session open. It returns the URL to continue it at.
func startUpload(t *testing.T, r *testkit.KilnRegistry, repo string, data []byte) *url.URL {
	t.Helper()
	resp := r.Do(t, repo, http.MethodPost, r.URL+"/v2/"+repo+"/blobs/uploads/", "", nil, http.StatusAccepted)
	u := location(t, r, resp)
	resp = r.Do(t, repo, http.MethodPatch, u.String(), "application/octet-stream", data, http.StatusAccepted)
	return location(t, r, resp)
}

func location(t *testing.T, r *testkit.KilnRegistry, resp *http.Response) *url.URL {
	t.Helper()
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	base, err := url.Parse(r.URL)
	if err != nil {
		t.Fatal(err)
	}
	return base.ResolveReference(loc)
}
