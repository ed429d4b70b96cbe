package buildcontext

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"path"
	"slices"
	"time"

	"github.com/moby/patternmatcher"
)

// nodeType is the kind of a context entry as it ends up on disk; its byte
// value is part of the hash encoding and must never change.
type nodeType byte

const (
	typeFile     nodeType = 'f'
	typeDir      nodeType = 'd'
	typeSymlink  nodeType = 'l'
	typeHardlink nodeType = 'h'
)

func (t nodeType) String() string {
	switch t {
	case typeFile:
		return "regular file"
	case typeDir:
		return "directory"
	case typeSymlink:
		return "symlink"
	case typeHardlink:
		return "hard link"
	}
	return "entry"
}

// node is what Receive remembers about one path of the extracted tree. The
// map of nodes is the authority on what is on disk: every recorded path's
// ancestors are recorded directories, which is what lets extraction refuse
// to write beneath a symlink without asking the filesystem.
type node struct {
	typ  nodeType
	mode uint32 // permission bits (+ sticky on directories) as written to disk
	link string // symlink target as archived; unused for other types
	sum  [32]byte
	// ino identifies the inode of regular files so hard links can be grouped
	// regardless of which path of the group the archive named first.
	ino   int
	mtime time.Time // directories only: applied once their children exist
}

// hashVersion prefixes the canonical encoding so a future change of the
// encoding can never collide with values stored by this one.
const hashVersion = "kiln-context-v1\n"

// contextHash computes Info.Hash over the extracted tree.
//
// The hash describes the tree a build will see, not the bytes that were
// uploaded: it is a function of the set of (path, type, mode, link target,
// content) of every entry that survives the context's .dockerignore, and of
// nothing else. Two uploads hash equal exactly when BuildKit would be handed
// the same files, whatever their archive order, compression, mtimes, owners,
// PAX/GNU encodings, explicit vs implied parent directories, or the content
// of ignored files.
//
// Which entries survive: those BuildKit's context transfer sends, i.e. the
// .dockerignore at the context root applied with fsutil's walk semantics
// (see ignorer). Receive does not add Docker's "always send the Dockerfile
// and .dockerignore" exceptions, because BuildKit does not see them either:
// the Dockerfile is hashed separately by the caller.
//
// Encoding (SHA-256 over):
//
//	"kiln-context-v1\n"
//	for each surviving entry, in ascending byte order of path:
//	    uint64 big-endian len(path) ‖ path      slash-separated, relative, no "./", no trailing "/"
//	    1 byte type                              'f' file, 'd' directory, 'l' symlink, 'h' hard link
//	    uint32 big-endian mode                   perm bits, plus 0o1000 sticky on directories; 0 for symlinks
//	    uint64 big-endian len(link) ‖ link       symlink: its target as archived; hard link: the path it
//	                                             shares an inode with (see below); otherwise empty
//	    32 bytes                                 SHA-256 of the content for 'f' and 'h'; zeros otherwise
//
// Hard links are canonicalized per inode: among the surviving paths that
// share one, the smallest path is encoded as 'f' and every other one as 'h'
// with link set to that smallest path. The context root itself is not an
// entry. The result is rendered as "sha256:" + lowercase hex.
func contextHash(nodes map[string]*node, ig *ignorer) (string, error) {
	surviving, err := survivors(nodes, ig)
	if err != nil {
		return "", err
	}
	slices.Sort(surviving)

	// First surviving path of every inode, in sorted order.
	primary := map[int]string{}
	for _, p := range surviving {
		n := nodes[p]
		if n.typ == typeFile || n.typ == typeHardlink {
			if _, ok := primary[n.ino]; !ok {
				primary[n.ino] = p
			}
		}
	}

	h := sha256.New()
	h.Write([]byte(hashVersion))
	var num [8]byte
	writeString := func(s string) {
		binary.BigEndian.PutUint64(num[:], uint64(len(s)))
		h.Write(num[:])
		h.Write([]byte(s))
	}
	var zero [32]byte
	for _, p := range surviving {
		n := nodes[p]
		typ, link, sum, mode := n.typ, "", zero, n.mode
		switch n.typ {
		case typeFile, typeHardlink:
			typ, sum = typeFile, n.sum
			if first := primary[n.ino]; first != p {
				typ, link = typeHardlink, first
			}
		case typeSymlink:
			link, mode = n.link, 0
		}
		writeString(p)
		h.Write([]byte{byte(typ)})
		binary.BigEndian.PutUint32(num[:4], mode)
		h.Write(num[:4])
		writeString(link)
		h.Write(sum[:])
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// survivors walks the recorded tree the way fsutil walks a directory (names
// in lexical order, parents before children) and returns the paths that a
// .dockerignore leaves in, including excluded directories that still have a
// surviving descendant.
func survivors(nodes map[string]*node, ig *ignorer) ([]string, error) {
	children := map[string][]string{}
	for p := range nodes {
		if p == "." {
			continue
		}
		d := path.Dir(p)
		children[d] = append(children[d], path.Base(p))
	}
	for _, c := range children {
		slices.Sort(c)
	}

	var out, pending []string
	var visit func(dir string, parent patternmatcher.MatchInfo) error
	visit = func(dir string, parent patternmatcher.MatchInfo) error {
		for _, name := range children[dir] {
			rel := name
			if dir != "." {
				rel = dir + "/" + name
			}
			excluded, descend, mi, err := ig.check(rel, nodes[rel].typ == typeDir, parent)
			if err != nil {
				return err
			}
			if !excluded {
				out = append(out, pending...)
				pending = pending[:0]
				out = append(out, rel)
			}
			if !descend {
				continue
			}
			if excluded {
				pending = append(pending, rel)
			}
			if err := visit(rel, mi); err != nil {
				return err
			}
			// A descendant that survived flushed the whole pending stack;
			// otherwise this directory is still on top and goes unsent.
			if excluded && len(pending) > 0 && pending[len(pending)-1] == rel {
				pending = pending[:len(pending)-1]
			}
		}
		return nil
	}
	if err := visit(".", patternmatcher.MatchInfo{}); err != nil {
		return nil, err
	}
	return out, nil
}

// ContentTime is the mtime a received file gets: a function of its content
// digest alone, so that equal content always has an equal mtime and
// different content (but for a 1 in 2^61 chance) a different one. BuildKit's
// incremental context transfer compares size and mtime; with these mtimes
// it resends exactly the files whose content changed. The times fall
// between 1970 and 2043, where every filesystem and BuildKit's stat
// encoding hold them exactly.
func ContentTime(sum [32]byte) time.Time {
	return time.Unix(0, int64(binary.BigEndian.Uint64(sum[:8])>>3)+1).UTC()
}
