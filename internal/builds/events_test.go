package builds

import (
	"slices"
	"testing"
	"time"
)

// The hub counts an attached build as watched while it has a subscriber,
// and as gone once it has had none for longer than the window, counted
// from submission or from when its last subscriber left.
func TestHubUnwatched(t *testing.T) {
	now := time.Unix(1000, 0)
	h := newHub()
	h.now = func() time.Time { return now }
	h.attach("gone")
	h.attach("watched")
	_, stopWatched := h.subscribe("watched")
	h.attach("finished")
	h.detach("finished")
	_, stopOther := h.subscribe("not-attached")
	defer stopOther()

	now = now.Add(time.Second)
	if got := h.unwatched(time.Second); len(got) != 0 {
		t.Fatalf("at the window's edge: %v", got)
	}
	now = now.Add(time.Millisecond)
	if got := h.unwatched(time.Second); !slices.Equal(got, []string{"gone"}) {
		t.Fatalf("unwatched = %v, want [gone]", got)
	}
	if got := h.unwatched(time.Second); len(got) != 0 {
		t.Fatalf("reported twice: %v", got)
	}

	// The window restarts when the last subscriber leaves; a second stop
	// of the same subscription changes nothing.
	now = now.Add(time.Hour)
	stopWatched()
	now = now.Add(500 * time.Millisecond)
	stopWatched()
	_, stop2 := h.subscribe("watched") // reconnected within the window
	now = now.Add(time.Hour)
	if got := h.unwatched(time.Second); len(got) != 0 {
		t.Fatalf("a reconnected build counts as gone: %v", got)
	}
	stop2()
	now = now.Add(2 * time.Second)
	if got := h.unwatched(time.Second); !slices.Equal(got, []string{"watched"}) {
		t.Fatalf("unwatched = %v, want [watched]", got)
	}
}
