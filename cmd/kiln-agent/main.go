// Command kiln-agent runs inside the builder VM, started by kiln-init
// (cmd/kiln-init) as the only service. It finds the host channel (the
// virtio-serial port named kiln.0), serves one builder session through
// internal/agent (a setup, then builds one after another until the host
// releases the builder or goes away) and exits; kiln-init then reboots
// the VM, which ends QEMU. The boot contract it relies on is documented in
// internal/builderimage. It must be built static (CGO_ENABLED=0).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"

	"github.com/kiln-build/kiln/internal/agent"
	"github.com/kiln-build/kiln/internal/builderimage"
)

func main() {
	// The agent's local log is the VM console; the host captures it and
	// shows its tail when a build fails in a way the protocol cannot
	// report.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	dev, err := findPort(builderimage.AgentPort)
	if err != nil {
		return err
	}
	// Open once for reading and writing, and keep it open: data the host
	// sends while the port is closed is dropped.
	port, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open host channel %s: %w", dev, err)
	}
	// agent.Run owns the port from here and closes it.
	return agent.Run(context.Background(), port, agent.VMEnv(version()))
}

// findPort maps a virtio-serial port name to its /dev node. There is no
// udev in the guest, so /dev/virtio-ports/NAME does not exist.
func findPort(name string) (string, error) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, p := range names {
		b, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(p)), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q among %d ports; the host must add virtserialport name=%s", name, len(names), name)
}

// version names the agent build in its hello. The image is built with
// -trimpath and without VCS stamps so it is reproducible; the Go version
// and the BuildKit module are what actually varies between images.
func version() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version + " " + info.GoVersion
	for _, d := range info.Deps {
		if d.Path == "github.com/moby/buildkit" {
			v += " buildkit " + d.Version
		}
	}
	return v
}
