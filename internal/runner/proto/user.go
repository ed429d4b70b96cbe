package proto

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// User is who the process runs as.
type User struct {
	UID, GID uint32
	// Groups are the supplementary groups.
	Groups []uint32
	// Home is the passwd entry's home directory, "/" without one.
	Home string
}

// ResolveUser interprets an image config's user ("", "name", "uid",
// either with ":group" or ":gid") against the image's /etc/passwd and
// /etc/group, either of which may be nil when the image has none. It
// follows Docker (runc's GetExecUser), so images behave as they do there:
//   - empty means root (uid 0); its passwd entry, if any, still applies;
//   - a name must be in passwd, a number need not be (gid 0, home "/");
//   - the primary group is the passwd entry's unless a group is given; a
//     group name must be in /etc/group, a number need not be;
//   - supplementary groups are those listing the user by name in
//     /etc/group, and only when no group was given.
func ResolveUser(spec string, passwd, group io.Reader) (User, error) {
	u := User{Home: "/"}
	userArg, groupArg, _ := strings.Cut(spec, ":")
	if userArg == "" {
		userArg = "0"
	}
	uid, uidErr := parseID(userArg)

	var name string
	if passwd != nil {
		entries, err := readColonFile(passwd, 4)
		if err != nil {
			return User{}, fmt.Errorf("read /etc/passwd: %w", err)
		}
		for _, f := range entries {
			id, err := parseID(f[2])
			if err != nil {
				continue
			}
			if (uidErr == nil && id == uid) || (uidErr != nil && f[0] == userArg) {
				gid, err := parseID(f[3])
				if err != nil {
					return User{}, fmt.Errorf("/etc/passwd entry for %s has a bad gid %q", f[0], f[3])
				}
				name, u.UID, u.GID = f[0], id, gid
				if len(f) > 5 && f[5] != "" {
					u.Home = f[5]
				}
				break
			}
		}
	}
	if name == "" {
		if uidErr != nil {
			return User{}, fmt.Errorf("unable to find user %s: no matching entries in the image's /etc/passwd", userArg)
		}
		u.UID = uid
	}

	if groupArg == "" && name == "" {
		return u, nil
	}
	gid, gidErr := parseID(groupArg)
	var matched []uint32
	if group != nil {
		entries, err := readColonFile(group, 3)
		if err != nil {
			return User{}, fmt.Errorf("read /etc/group: %w", err)
		}
		for _, f := range entries {
			id, err := parseID(f[2])
			if err != nil {
				continue
			}
			switch {
			case groupArg == "":
				if len(f) > 3 && memberOf(f[3], name) {
					matched = append(matched, id)
				}
			case gidErr == nil:
				if id == gid {
					matched = append(matched, id)
				}
			case f[0] == groupArg:
				matched = append(matched, id)
			}
		}
	}
	switch {
	case groupArg == "":
		u.Groups = matched
	case len(matched) > 0:
		u.GID = matched[0]
	case gidErr != nil:
		return User{}, fmt.Errorf("unable to find group %s: no matching entries in the image's /etc/group", groupArg)
	default:
		u.GID = gid
	}
	return u, nil
}

func memberOf(list, name string) bool {
	for _, m := range strings.Split(list, ",") {
		if strings.TrimSpace(m) == name {
			return true
		}
	}
	return false
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readColonFile returns the colon-separated fields of each line with at
// least min fields, skipping blank lines and comments.
func readColonFile(r io.Reader, min int) ([][]string, error) {
	var out [][]string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, ":")
		if len(f) < min {
			continue
		}
		out = append(out, f)
	}
	return out, sc.Err()
}
