//go:build unix

package buildcontext

import (
	"os/exec"
	"syscall"
)

// killGroupOnCancel makes a canceled cmd kill its whole process group:
// git leaves the transfer to a helper (git-remote-http, ssh) that would
// otherwise outlive it.
func killGroupOnCancel(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
}
