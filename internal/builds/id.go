package builds

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"strings"
	"time"
)

var idEncoding = base32.NewEncoding("0123456789abcdefghjkmnpqrstvwxyz").WithPadding(base32.NoPadding)

// newID returns a time-ordered id: 48 bits of milliseconds then 80 random
// bits, base32 (Crockford alphabet, lower case), prefixed "b".
func newID() string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(time.Now().UnixMilli())<<16)
	rand.Read(b[6:])
	return "b" + strings.ToLower(idEncoding.EncodeToString(b[:]))
}

// validID reports whether s could be an id newID made; it keeps request
// paths from reaching the filesystem with anything else.
func validID(s string) bool {
	if len(s) != 27 || s[0] != 'b' {
		return false
	}
	for _, c := range s[1:] {
		if !strings.ContainsRune("0123456789abcdefghjkmnpqrstvwxyz", c) {
			return false
		}
	}
	return true
}
