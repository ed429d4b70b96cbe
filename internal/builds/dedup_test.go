package builds

import (
	"errors"
	"slices"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/store"
)

// Every image a Dockerfile uses is found, with ARGs expanded the way
// BuildKit expands them — build args over ARG defaults, and its automatic
// platform args — so none escapes pinning and the input hash.
func TestBaseImagesExpandsArgsAsBuildKitDoes(t *testing.T) {
	df := `ARG BASE=alpine:3.20
ARG TAG
FROM ${BASE} AS build
FROM busybox-${TARGETARCH}:1
COPY --from=build /a /a
COPY --from=tools:${TAG} /b /b
RUN --mount=from=cachebox,target=/c true
FROM scratch
`
	got, err := baseImages([]byte(df), map[string]string{"TAG": "2"}, "linux/amd64")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"alpine:3.20", "busybox-amd64:1", "tools:2", "cachebox"}
	if !slices.Equal(got, want) {
		t.Errorf("baseImages = %v, want %v", got, want)
	}
	if got, _ := baseImages([]byte(df), map[string]string{"BASE": "debian:12"}, "linux/amd64"); got[0] != "debian:12" {
		t.Errorf("a build arg does not override the ARG default: %v", got)
	}
	if got, _ := baseImages([]byte(df), nil, "linux/arm/v7"); !slices.Contains(got, "busybox-arm:1") {
		t.Errorf("TARGETARCH is not the target platform's: %v", got)
	}
}

func TestSyntaxImageComesFromTheBuildArgFirst(t *testing.T) {
	df := []byte("# syntax=docker/dockerfile:1\nFROM scratch\n")
	if got := syntaxImage(df, nil); got != "docker/dockerfile:1" {
		t.Errorf("syntax line: %q", got)
	}
	if got := syntaxImage(df, map[string]string{"BUILDKIT_SYNTAX": " example.com/fe:2 arg"}); got != "example.com/fe:2" {
		t.Errorf("build arg: %q", got)
	}
	if got := syntaxImage([]byte("FROM scratch\n"), nil); got != "" {
		t.Errorf("no frontend: %q", got)
	}
}

func TestKnobsAreValidatedAndEnterTheHashOnlyWhenSet(t *testing.T) {
	bad := []Request{
		{AddHosts: []string{"db.internal"}},
		{AddHosts: []string{"db internal:10.0.0.1"}},
		{AddHosts: []string{"db:not-an-ip"}},
		{Ulimits: []string{"nofiles=10"}},
		{Ulimits: []string{"nofile=ten"}},
		{ShmSize: -1},
		{Labels: map[string]string{"": "x"}},
	}
	for _, r := range bad {
		var o store.BuildOptions
		if err := validateKnobs(&r, &o); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%+v: err = %v, want invalid", r, err)
		}
	}
	var o store.BuildOptions
	r := Request{AddHosts: []string{"db:10.0.0.1", "v6=::1"}, Ulimits: []string{"nofile=1024:2048"}}
	if err := validateKnobs(&r, &o); err != nil || !slices.Equal(o.AddHosts, []string{"db=10.0.0.1", "v6=::1"}) {
		t.Errorf("valid knobs: %v %v", err, o.AddHosts)
	}

	s := &Service{}
	plain := s.inputHash("sha256:c", []byte("FROM scratch"), store.BuildOptions{}, nil)
	if again := s.inputHash("sha256:c", []byte("FROM scratch"), store.BuildOptions{Labels: map[string]string{}}, nil); again != plain {
		t.Error("an empty label set changed the hash of a build without knobs")
	}
	seen := map[string]bool{plain: true}
	for _, k := range []store.BuildOptions{
		{Labels: map[string]string{"a": "1"}},
		{Annotations: map[string]string{"a": "1"}},
		{AddHosts: []string{"db=10.0.0.1"}},
		{Ulimits: []string{"nofile=1"}},
		{ShmSize: 1 << 20},
	} {
		h := s.inputHash("sha256:c", []byte("FROM scratch"), k, nil)
		if seen[h] {
			t.Errorf("%+v hashes like another build", k)
		}
		seen[h] = true
	}
}
