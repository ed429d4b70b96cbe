// Package version says which kiln this binary is: its version, the commit
// it was built from and the BuildKit it was built with, read from the Go
// build information (or set at link time). The client (kiln version) and
// the server (GET /v1/version) report the same facts.
package version

import (
	"runtime"
	"runtime/debug"
	"strings"
)

// Version overrides the version read from the build information; release
// builds set it with
//
//	go build -ldflags "-X github.com/kiln-build/kiln/internal/version.Version=v1.2.3" ./cmd/kiln
var Version string

// Info describes one kiln binary.
type Info struct {
	// Version is Version when set, else the main module's version (a
	// tag, or the pseudo-version go build derives from the commit), else
	// "devel".
	Version string `json:"version"`
	// Commit is the VCS revision, with "-dirty" for local changes; empty
	// when the build recorded none.
	Commit    string `json:"commit,omitempty"`
	GoVersion string `json:"go_version"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
	// BuildKit is the version of the BuildKit module linked in (v0.34.2),
	// or "unknown".
	BuildKit string `json:"buildkit"`
}

// Get returns this binary's version information.
func Get() Info {
	in := Info{Version: Version, GoVersion: runtime.Version(), OS: runtime.GOOS, Arch: runtime.GOARCH, BuildKit: "unknown"}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		if in.Version == "" {
			in.Version = "devel"
		}
		return in
	}
	if in.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		in.Version = bi.Main.Version
	}
	if in.Version == "" {
		in.Version = "devel"
	}
	var rev string
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && modified {
		rev += "-dirty"
	}
	in.Commit = rev
	for _, d := range bi.Deps {
		if d.Path == "github.com/moby/buildkit" {
			in.BuildKit = d.Version
			if d.Replace != nil && d.Replace.Version != "" {
				in.BuildKit = d.Replace.Version
			}
		}
	}
	in.GoVersion = strings.TrimSpace(bi.GoVersion)
	return in
}
