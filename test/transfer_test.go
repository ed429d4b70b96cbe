package test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestWarmContextTransferSeesEveryChange: the scope's builds share
// BuildKit's incremental context transfer, which resends a file only when
// its size or mtime changed. Every kind of change must still reach the
// build: an edit that keeps the size and the archive's (zero) mtime, a
// deletion, a rename and a mode change.
func TestWarmContextTransferSeesEveryChange(t *testing.T) {
	s := startServer(t)
	base := s.base()
	type file struct {
		body string
		mode int64
	}
	dockerfile := fmt.Sprintf("FROM %s\nCOPY . /ctx\nRUN cd /ctx && for f in $(ls | sort); do echo \"entry $f $(stat -c %%a $f) $(cat $f)\"; done\n", base)
	tarOf := func(files map[string]file) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for name, f := range map[string]file{"Dockerfile": {dockerfile, 0o644}} {
			tw.WriteHeader(&tar.Header{Name: name, Mode: f.mode, Size: int64(len(f.body)), Typeflag: tar.TypeReg})
			tw.Write([]byte(f.body))
		}
		for name, f := range files {
			// Reproducible archives: every mtime is zero.
			tw.WriteHeader(&tar.Header{Name: name, Mode: f.mode, Size: int64(len(f.body)), Typeflag: tar.TypeReg})
			tw.Write([]byte(f.body))
		}
		tw.Close()
		return buf.Bytes()
	}
	run := func(files map[string]file) string {
		b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{context: tarOf(files)}))
		var entries []string
		for _, line := range strings.Split(s.logText(s.admin, b.Id), "\n") {
			if i := strings.Index(line, "| entry "); i >= 0 {
				entries = append(entries, line[i+len("| entry "):])
			}
		}
		return strings.Join(entries, "\n")
	}

	first := run(map[string]file{"same.txt": {"aaaa", 0o644}, "gone.txt": {"bye", 0o644},
		"old-name.txt": {"moving", 0o644}, "script.sh": {"echo", 0o644}})
	for _, w := range []string{"same.txt 644 aaaa", "gone.txt 644 bye", "old-name.txt 644 moving", "script.sh 644 echo"} {
		if !strings.Contains(first, w) {
			t.Fatalf("first build lacks %q; it saw:\n%s", w, first)
		}
	}

	second := run(map[string]file{"same.txt": {"bbbb", 0o644}, "new-name.txt": {"moving", 0o644},
		"script.sh": {"echo", 0o755}})
	for _, w := range []string{"same.txt 644 bbbb", "new-name.txt 644 moving", "script.sh 755 echo"} {
		if !strings.Contains(second, w) {
			t.Errorf("second build lacks %q; it saw:\n%s", w, second)
		}
	}
	for _, gone := range []string{"gone.txt", "old-name.txt", "aaaa"} {
		if strings.Contains(second, gone) {
			t.Errorf("second build still sees %q; it saw:\n%s", gone, second)
		}
	}
}

// TestKilnBuildSendsOnlyChangedFiles is the content-addressed upload end
// to end: `kiln build` of an unchanged directory sends no file content,
// one changed file sends that file, and the build sees the change.
func TestKilnBuildSendsOnlyChangedFiles(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(fmt.Sprintf("FROM %s\nCOPY . /ctx\nRUN cat /ctx/data/f7\n", s.base())), 0o644)
	os.MkdirAll(filepath.Join(dir, "data"), 0o755)
	for i := range 20 {
		os.WriteFile(filepath.Join(dir, "data", fmt.Sprintf("f%d", i)), []byte(strings.Repeat(fmt.Sprintf("file %d;", i), 100)), 0o644)
	}
	build := func() string {
		t.Helper()
		out, err := exec.Command(kilnBinary(t), "build", "--addr", s.url(""), "--token", s.admin, "--progress", "plain", dir).CombinedOutput()
		if err != nil {
			t.Fatalf("kiln build: %v\n%s", err, out)
		}
		return string(out)
	}
	first := build()
	if !strings.Contains(first, "context: 22 files") {
		t.Fatalf("first build does not report its context:\n%s", first)
	}
	if again := build(); !strings.Contains(again, "sent 0 B (22 unchanged)") {
		t.Errorf("an unchanged context was sent again:\n%s", again)
	}
	os.WriteFile(filepath.Join(dir, "data", "f7"), []byte("changed content of f7"), 0o644)
	changed := build()
	if !strings.Contains(changed, "sent 21 B (21 unchanged)") {
		t.Errorf("a one-file change did not send exactly that file:\n%s", changed)
	}
	if !strings.Contains(changed, "changed content of f7") {
		t.Errorf("the build did not see the changed file:\n%s", changed)
	}

	// An edit that keeps the size and puts the mtime back (what a
	// checkout or a reproducible extract does) still reaches the build.
	f7 := filepath.Join(dir, "data", "f7")
	fi, _ := os.Stat(f7)
	os.WriteFile(f7, []byte("CHANGED content of f7"), 0o644)
	os.Chtimes(f7, fi.ModTime(), fi.ModTime())
	if same := build(); !strings.Contains(same, "CHANGED content of f7") || !strings.Contains(same, "sent 21 B") {
		t.Errorf("a same-size edit with its mtime put back was built stale:\n%s", same)
	}
}
