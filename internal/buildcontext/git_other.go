//go:build !unix

package buildcontext

import "os/exec"

func killGroupOnCancel(*exec.Cmd) {}
