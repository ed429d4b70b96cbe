package builds

import (
	"slices"
	"testing"
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
	got, err := baseImages([]byte(df), map[string]string{"TAG": "2"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"alpine:3.20", "busybox-amd64:1", "tools:2", "cachebox"}
	if !slices.Equal(got, want) {
		t.Errorf("baseImages = %v, want %v", got, want)
	}
	if got, _ := baseImages([]byte(df), map[string]string{"BASE": "debian:12"}); got[0] != "debian:12" {
		t.Errorf("a build arg does not override the ARG default: %v", got)
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
