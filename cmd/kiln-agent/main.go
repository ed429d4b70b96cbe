// Command kiln-agent runs inside the builder VM. This is a placeholder that
// proves the boot path: it finds the host channel (the virtio-serial port
// named kiln.0), reports "kiln-agent ready <kernel> <memory MiB>" on it and
// powers the VM off. The real agent (BuildKit solves over internal/guest)
// replaces this file; the boot contract it can rely on is documented in
// internal/builderimage. It must be built static (CGO_ENABLED=0).
package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const portName = "kiln.0"

func main() {
	err := run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln-agent: %v\n", err)
	}
	unix.Sync()
	// reboot=t plus QEMU's -no-reboot turn a restart into QEMU exiting.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	if err != nil {
		os.Exit(1)
	}
}

func run() error {
	dev, err := findPort(portName)
	if err != nil {
		return err
	}
	// Open once for reading and writing: data the host sends while the
	// port is closed is dropped.
	port, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open host channel %s: %w", dev, err)
	}
	defer port.Close()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	mem, err := memTotalMiB()
	if err != nil {
		return err
	}
	line := fmt.Sprintf("kiln-agent ready %s %d\n", unix.ByteSliceToString(uts.Release[:]), mem)
	fmt.Fprint(os.Stdout, line)
	if _, err := port.WriteString(line); err != nil {
		return fmt.Errorf("write to host channel %s: %w", dev, err)
	}
	return nil
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

func memTotalMiB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("read memory size: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kib, err := strconv.Atoi(fields[1])
			if err != nil {
				return 0, fmt.Errorf("parse MemTotal %q: %w", fields[1], err)
			}
			return kib / 1024, nil
		}
	}
	return 0, errors.New("no MemTotal in /proc/meminfo")
}
