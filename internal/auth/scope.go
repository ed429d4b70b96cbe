package auth

import (
	"fmt"
	"slices"
	"strings"
)

// Scope is one permission a kiln token grants.
type Scope string

// The scopes kiln knows. Stronger scopes imply weaker ones (see Implies).
const (
	ScopeBuildRead  Scope = "build:read"
	ScopeBuildWrite Scope = "build:write"
	ScopeBuildAdmin Scope = "build:admin"
	ScopeImageRead  Scope = "image:read"
	ScopeImageWrite Scope = "image:write"
	ScopeCacheAdmin Scope = "cache:admin"
)

// AllScopes lists every known scope in a stable order.
var AllScopes = []Scope{
	ScopeBuildRead, ScopeBuildWrite, ScopeBuildAdmin,
	ScopeImageRead, ScopeImageWrite, ScopeCacheAdmin,
}

// Valid reports whether s is a scope kiln knows.
func (s Scope) Valid() bool { return slices.Contains(AllScopes, s) }

// Implies reports whether holding s also grants other. build:admin grants
// everything; write scopes grant the matching read scope, because writing
// without being able to read back what was written is never useful (a
// registry push, for one, needs pull as well).
func (s Scope) Implies(other Scope) bool {
	switch {
	case s == other:
		return true
	case s == ScopeBuildAdmin:
		return other.Valid()
	case s == ScopeBuildWrite:
		return other == ScopeBuildRead
	case s == ScopeImageWrite:
		return other == ScopeImageRead
	}
	return false
}

// ParseScopes parses a comma-separated list such as "build:write,image:read".
// Blank entries are ignored and duplicates removed; an unknown scope is an
// error that names it and lists the valid ones.
func ParseScopes(s string) ([]Scope, error) {
	var out []Scope
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		sc := Scope(part)
		if !sc.Valid() {
			return nil, fmt.Errorf("unknown scope %q: valid scopes are %s", part, scopeList())
		}
		if !slices.Contains(out, sc) {
			out = append(out, sc)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no scopes given: pass a comma-separated list of %s", scopeList())
	}
	return out, nil
}

func validateScopes(scopes []Scope) error {
	if len(scopes) == 0 {
		return fmt.Errorf("a token needs at least one scope: choose from %s", scopeList())
	}
	for _, s := range scopes {
		if !s.Valid() {
			return fmt.Errorf("unknown scope %q: valid scopes are %s", s, scopeList())
		}
	}
	return nil
}

// ScopeNames spells scopes as strings, for APIs, records and help text.
func ScopeNames(scopes []Scope) []string {
	names := make([]string, len(scopes))
	for i, s := range scopes {
		names[i] = string(s)
	}
	return names
}

func scopeList() string { return strings.Join(ScopeNames(AllScopes), ", ") }
