// Command sshlist is what the ssh tests run inside a build step, in
// place of ssh-add -l (no static ssh-add exists to put in a FROM scratch
// image): it lists the keys of the agent at $SSH_AUTH_SOCK, one line per
// key ("key SHA256:… comment"), and proves each one signs through the
// agent ("signed SHA256:…"). It exits 2 when the agent cannot be reached
// and 1 when it has no keys.
package main

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

func main() {
	sock := os.Getenv("SSH_AUTH_SOCK")
	if sock == "" {
		fmt.Fprintln(os.Stderr, "sshlist: SSH_AUTH_SOCK is not set")
		os.Exit(2)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sshlist:", err)
		os.Exit(2)
	}
	defer conn.Close()
	a := agent.NewClient(conn)
	keys, err := a.List()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sshlist: list keys:", err)
		os.Exit(2)
	}
	if len(keys) == 0 {
		fmt.Println("The agent has no identities.")
		os.Exit(1)
	}
	for _, k := range keys {
		fp := ssh.FingerprintSHA256(k)
		fmt.Printf("key %s %s\n", fp, k.Comment)
		data := make([]byte, 32)
		rand.Read(data)
		sig, err := a.Sign(k, data)
		if err != nil {
			fmt.Fprintf(os.Stderr, "sshlist: sign with %s: %v\n", fp, err)
			os.Exit(2)
		}
		if err := k.Verify(data, sig); err != nil {
			fmt.Fprintf(os.Stderr, "sshlist: signature of %s does not verify: %v\n", fp, err)
			os.Exit(2)
		}
		fmt.Printf("signed %s\n", fp)
	}
}
