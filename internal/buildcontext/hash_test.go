package buildcontext

import (
	"archive/tar"
	"strings"
	"testing"
	"time"
)

func baseEntries() []ent {
	return []ent{
		dir("app/"),
		file("app/main.go", "package main\n"),
		withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755),
		symlink("current", "app"),
		file("README", "hello\n"),
	}
}

func TestHashIgnoresMtimesOwnersOrderAndEncoding(t *testing.T) {
	base := hashOf(t, mkTar(t, baseEntries()...))

	var restamped []ent
	for i, e := range baseEntries() {
		restamped = append(restamped, withOwner(withTime(e, time.Unix(int64(1e9+i*7777), 0)), 1000+i, "someone"))
	}
	reordered := []ent{
		file("README", "hello\n"),
		symlink("current", "app"),
		withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755),
		file("app/main.go", "package main\n"),
		dir("app/"),
	}
	var gnu []ent
	for _, e := range baseEntries() {
		e.fmt = tar.FormatGNU
		gnu = append(gnu, e)
	}
	withDotSlash := []ent{dir("./"), dir("./app/"), file("./app/main.go", "package main\n"),
		withMode(file("./app/run.sh", "#!/bin/sh\n"), 0o755), symlink("./current", "app"), file("./README", "hello\n")}

	for name, data := range map[string][]byte{
		"different mtimes and owners": mkTar(t, restamped...),
		"different order":             mkTar(t, reordered...),
		"GNU instead of USTAR/PAX":    mkTar(t, gnu...),
		"./ prefixes and root entry":  mkTar(t, withDotSlash...),
		"zstd":                        zst(t, mkTar(t, baseEntries()...)),
	} {
		if got := hashOf(t, data); got != base {
			t.Errorf("%s: hash %s, want %s", name, got, base)
		}
	}
}

func TestHashChangesWithWhatABuildSees(t *testing.T) {
	base := hashOf(t, mkTar(t, baseEntries()...))
	variants := map[string][]ent{
		"content":             {dir("app/"), file("app/main.go", "package main // changed\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755), symlink("current", "app"), file("README", "hello\n")},
		"file mode":           {dir("app/"), file("app/main.go", "package main\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o644), symlink("current", "app"), file("README", "hello\n")},
		"dir mode":            {withMode(dir("app/"), 0o700), file("app/main.go", "package main\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755), symlink("current", "app"), file("README", "hello\n")},
		"symlink target":      {dir("app/"), file("app/main.go", "package main\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755), symlink("current", "app/main.go"), file("README", "hello\n")},
		"renamed file":        {dir("app/"), file("app/main.go", "package main\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755), symlink("current", "app"), file("README.md", "hello\n")},
		"extra empty dir":     append(baseEntries(), dir("empty/")),
		"symlink made a copy": {dir("app/"), file("app/main.go", "package main\n"), withMode(file("app/run.sh", "#!/bin/sh\n"), 0o755), file("current", "app"), file("README", "hello\n")},
	}
	seen := map[string]string{base: "base"}
	for name, entries := range variants {
		got := hashOf(t, mkTar(t, entries...))
		if other, dup := seen[got]; dup {
			t.Errorf("%s hashes the same as %s", name, other)
		}
		seen[got] = name
	}
}

func TestHashHardLinks(t *testing.T) {
	ab := hashOf(t, mkTar(t, file("a", "x"), hardlink("b", "a")))
	ba := hashOf(t, mkTar(t, file("b", "x"), hardlink("a", "b")))
	copies := hashOf(t, mkTar(t, file("a", "x"), file("b", "x")))
	if ab != ba {
		t.Error("the same hard-linked pair hashed differently depending on which name the archive stored first")
	}
	if ab == copies {
		t.Error("a hard-linked pair hashed the same as two independent copies")
	}
	chain := hashOf(t, mkTar(t, file("a", "x"), hardlink("b", "a"), hardlink("c", "b")))
	star := hashOf(t, mkTar(t, file("c", "x"), hardlink("a", "c"), hardlink("b", "c")))
	if chain != star {
		t.Error("three names of one inode hashed differently depending on how the archive chained them")
	}
}

func TestHashHonoursDockerignore(t *testing.T) {
	ignore := file(".dockerignore", "*.log\nbuild\n!build/keep.txt\n**/secret*\n")
	tree := func(logContent, secret, kept string) []byte {
		return mkTar(t,
			ignore,
			file("main.go", "package main\n"),
			file("debug.log", logContent),
			dir("build/"),
			file("build/out.bin", logContent),
			file("build/keep.txt", kept),
			dir("deep/"), dir("deep/er/"),
			file("deep/er/secret.key", secret),
		)
	}
	base := hashOf(t, tree("log 1", "s3cr3t", "kept 1"))
	if got := hashOf(t, tree("log 2", "s3cr3t", "kept 1")); got != base {
		t.Error("changing ignored *.log and build/out.bin changed the hash")
	}
	if got := hashOf(t, tree("log 1", "other", "kept 1")); got != base {
		t.Error("changing an ignored **/secret* file changed the hash")
	}
	if got := hashOf(t, tree("log 1", "s3cr3t", "kept 2")); got == base {
		t.Error("changing build/keep.txt, re-included by !build/keep.txt, did not change the hash")
	}
	// Leaving the ignored files out entirely is the same tree as far as the
	// build can tell; the excluded build/ directory survives because it
	// still has a kept child.
	without := hashOf(t, mkTar(t, ignore, file("main.go", "package main\n"), dir("build/"), file("build/keep.txt", "kept 1"), dir("deep/"), dir("deep/er/")))
	if without != base {
		t.Error("a context without its ignored files hashed differently from one with them")
	}
	_, info := mustReceive(t, tree("log 1", "s3cr3t", "kept 1"))
	if len(info.Excludes) != 4 || info.Excludes[2] != "!build/keep.txt" {
		t.Errorf("Excludes = %q, want the four patterns", info.Excludes)
	}
}

func TestHashWithoutDockerignoreCoversEverything(t *testing.T) {
	a := hashOf(t, mkTar(t, file("a.log", "1")))
	b := hashOf(t, mkTar(t, file("a.log", "2")))
	if a == b {
		t.Error("without a .dockerignore every file must count")
	}
}

func TestHashOfPackedDirectoryIgnoresMtimes(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"a/b.txt": "b", "c.txt": "c", ".dockerignore": "*.tmp\n", "x.tmp": "1"})
	first := hashOf(t, packBytes(t, src, PackOptions{}))
	touchAll(t, src, time.Unix(1234567890, 0))
	writeFiles(t, src, map[string]string{"x.tmp": "2"})
	if got := hashOf(t, packBytes(t, src, PackOptions{Compression: Zstd})); got != first {
		t.Error("re-packing after touching every file and editing an ignored one changed the hash")
	}
}

// BuildKit honours "<Dockerfile>.dockerignore" over .dockerignore, so for
// a build of that Dockerfile the hash must cover what that file leaves in:
// here notes.txt, which .dockerignore alone would hide. Pack, given the
// Dockerfile, sends by the same file.
func TestHashForDockerfileHonoursItsOwnIgnoreFile(t *testing.T) {
	tree := func(notes string) []byte {
		return mkTar(t,
			file(".dockerignore", "notes.txt\n"),
			dir("ci/"),
			file("ci/app.Dockerfile", "FROM scratch\n"),
			file("ci/app.Dockerfile.dockerignore", "*.log\n"),
			file("notes.txt", notes),
			file("debug.log", "noise"),
		)
	}
	_, one := mustReceive(t, tree("v1"))
	_, two := mustReceive(t, tree("v2"))
	if one.Hash != two.Hash {
		t.Fatal("under .dockerignore alone, notes.txt must not count")
	}
	appOne, err := one.ForDockerfile("ci/app.Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	appTwo, err := two.ForDockerfile("ci/app.Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if appOne.Hash == appTwo.Hash {
		t.Error("a build of ci/app.Dockerfile sees notes.txt, but changing it did not change the hash")
	}
	if appOne.IgnoreFile != "ci/app.Dockerfile.dockerignore" || len(appOne.Excludes) != 1 || appOne.Excludes[0] != "*.log" {
		t.Errorf("ForDockerfile honoured %q with %q", appOne.IgnoreFile, appOne.Excludes)
	}
	if same, err := one.ForDockerfile("Dockerfile"); err != nil || same.Hash != one.Hash || same.IgnoreFile != ".dockerignore" {
		t.Errorf("without Dockerfile.dockerignore the hash must stay: %v %q", err, same.IgnoreFile)
	}

	src := t.TempDir()
	writeFiles(t, src, map[string]string{
		".dockerignore": "notes.txt\n", "ci/app.Dockerfile": "FROM scratch\n",
		"ci/app.Dockerfile.dockerignore": "*.log\nci/\n", "notes.txt": "v1", "debug.log": "noise",
	})
	names := strings.Join(tarNames(t, packBytes(t, src, PackOptions{Dockerfile: "ci/app.Dockerfile", Compression: Uncompressed})), " ")
	for _, want := range []string{"notes.txt", "ci/app.Dockerfile", "ci/app.Dockerfile.dockerignore"} {
		if !strings.Contains(names, want) {
			t.Errorf("pack with ci/app.Dockerfile left out %s: %s", want, names)
		}
	}
	if strings.Contains(names, "debug.log") {
		t.Errorf("pack with ci/app.Dockerfile sent debug.log, which its ignore file excludes: %s", names)
	}
}
