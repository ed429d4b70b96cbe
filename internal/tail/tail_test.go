package tail

import (
	"strings"
	"testing"
)

func TestKeepsOnlyTheLastBytes(t *testing.T) {
	b := New(10)
	b.Write([]byte("hello "))
	b.Write([]byte("world, and more"))
	if got := b.String(); got != ", and more" {
		t.Errorf("got %q", got)
	}
	b = New(4)
	b.Write([]byte("aé€")) // the kept tail starts inside a multi-byte rune
	if got := b.String(); !strings.HasSuffix(got, "€") || strings.ContainsRune(got, '\uFFFD') {
		t.Errorf("got %q", got)
	}
}
