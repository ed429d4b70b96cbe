package cli

import (
	"archive/tar"
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

// Kinds of build context, as docker buildx tells them apart.
const (
	contextDir     = "dir"     // a local directory, packed by kiln
	contextStdin   = "stdin"   // "-": a Dockerfile (no context) or a tar on stdin
	contextTarFile = "tarfile" // a local file holding a tar (plain, gzip or zstd)
	contextGit     = "git"     // a git URL, fetched by the server
	contextHTTP    = "http"    // an HTTP(S) URL of a tarball or a Dockerfile, downloaded by the server
)

// contextKind classifies the CONTEXT argument: "-", a git URL, another
// http(s) URL, or a local path (a directory or a file).
func contextKind(arg string) string {
	switch {
	case arg == "-":
		return contextStdin
	case isGitURL(arg):
		return contextGit
	case strings.HasPrefix(arg, "http://") || strings.HasPrefix(arg, "https://"):
		return contextHTTP
	}
	return contextDir
}

// isGitURL is docker's rule (urlutil.IsGitURL, as buildx applies it): an
// http(s) URL whose path ends in .git (before any #fragment), or a
// git://, ssh://, git@ or github.com/ address.
func isGitURL(s string) bool {
	if strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://") {
		u, _, _ := strings.Cut(s, "#")
		u, _, _ = strings.Cut(u, "?")
		return strings.HasSuffix(u, ".git")
	}
	for _, p := range []string{"git://", "ssh://", "git@", "github.com/"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

var (
	magicGzip  = []byte{0x1f, 0x8b}
	magicZstd  = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicBzip2 = []byte("BZh")
	magicXz    = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
)

// archivePeek is how many leading bytes isArchive looks at: a tar
// header's "ustar" magic sits at offset 257.
const archivePeek = 512

// isArchive reports whether head (the first bytes of a stream) starts a
// tar or a compressed stream, as docker tells a context on stdin from a
// Dockerfile. Compressed streams other than gzip and zstd count too, so
// the server's message about them reaches the user.
func isArchive(head []byte) bool {
	for _, m := range [][]byte{magicGzip, magicZstd, magicBzip2, magicXz} {
		if bytes.HasPrefix(head, m) {
			return true
		}
	}
	if len(head) >= 262 && string(head[257:262]) == "ustar" {
		return true
	}
	// A tar whose first header is an old v7 one has no magic: a header
	// block archive/tar reads is enough.
	if len(head) >= 512 {
		if _, err := tar.NewReader(bytes.NewReader(head[:512])).Next(); err == nil {
			return true
		}
	}
	return false
}

// emptyTar is a tar with no entries: the context of a build whose
// Dockerfile came on stdin, as docker sends it.
func emptyTar() []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.Close()
	return b.Bytes()
}

// rawContext is a context sent as it is, in the "context" part: a tar the
// user gave (on stdin or as a file), or the empty one.
type rawContext struct {
	name string // for messages: "standard input", the file's path
	r    io.Reader
	path string // a file opened when the upload starts
}

// open returns the context's reader and what closes it.
func (rc *rawContext) open() (io.Reader, func(), error) {
	if rc.r != nil {
		return rc.r, func() {}, nil
	}
	f, err := os.Open(rc.path)
	if err != nil {
		return nil, nil, fmt.Errorf("build context %s: %w", rc.path, err)
	}
	return f, func() { f.Close() }, nil
}

// peekStdin reads the start of stdin without losing it.
func peekStdin(stdin io.Reader) (*bufio.Reader, []byte, error) {
	br := bufio.NewReaderSize(stdin, 64<<10)
	head, err := br.Peek(archivePeek)
	if err != nil && err != io.EOF && err != bufio.ErrBufferFull {
		return nil, nil, fmt.Errorf("read standard input: %w", err)
	}
	return br, head, nil
}

// fileIsArchive reports whether the file at p starts like a tar or a
// compressed tar.
func fileIsArchive(p string) (bool, error) {
	f, err := os.Open(p)
	if err != nil {
		return false, err
	}
	defer f.Close()
	head := make([]byte, archivePeek)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return false, err
	}
	return isArchive(head[:n]), nil
}

// dockerfileInContext checks -f for a context kiln does not read itself
// (a tar, a git repository): a relative path inside that context.
func dockerfileInContext(file string) (string, error) {
	clean := path.Clean(strings.ReplaceAll(file, `\`, "/"))
	if strings.HasPrefix(clean, "/") || clean == ".." || strings.HasPrefix(clean, "../") || clean == "." {
		return "", fmt.Errorf("-f %q: with a tar or git context, -f names the Dockerfile inside it, as a relative path like docker/Dockerfile", file)
	}
	return clean, nil
}
