package sshrelay

import (
	"context"
	"errors"
	"fmt"
	"net"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// MaxKeyBytes bounds one private key file (an RSA 16384-bit key in PEM is
// about 13 KiB).
const MaxKeyBytes = 64 << 10

// MaxKeys bounds the key files of one build, over all its ids.
const MaxKeys = 16

// ErrEncryptedKey: a key file is protected by a passphrase, which nothing
// on the way can ask for.
var ErrEncryptedKey = errors.New("the key is encrypted with a passphrase, which kiln cannot ask for: add it to your ssh-agent (ssh-add FILE) and forward the agent instead (--ssh ID, which uses $SSH_AUTH_SOCK)")

// ParseKey parses one private key file. Its errors never quote the file.
func ParseKey(data []byte) (any, error) {
	if len(data) > MaxKeyBytes {
		return nil, fmt.Errorf("the key file is over %d bytes; is it a private key?", MaxKeyBytes)
	}
	k, err := ssh.ParseRawPrivateKey(data)
	if err != nil {
		var pm *ssh.PassphraseMissingError
		if errors.As(err, &pm) {
			return nil, ErrEncryptedKey
		}
		// x/crypto's texts ("ssh: no key found", "ssh: unhandled key
		// type") name the problem, never the content.
		return nil, fmt.Errorf("not an unencrypted OpenSSH, PKCS#1, PKCS#8 or EC private key (%v)", err)
	}
	return k, nil
}

// Keyring is an agent holding the given private key files, read-only. It
// lives in memory only.
func Keyring(keys [][]byte) (agent.ExtendedAgent, error) {
	ring := agent.NewKeyring()
	for i, data := range keys {
		k, err := ParseKey(data)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i+1, err)
		}
		if err := ring.Add(agent.AddedKey{PrivateKey: k}); err != nil {
			return nil, fmt.Errorf("key %d: %w", i+1, err)
		}
	}
	return ReadOnly(ring.(agent.ExtendedAgent)), nil
}

// Dialer opens one agent connection.
type Dialer func(ctx context.Context) (net.Conn, error)

// AgentDialer returns a Dialer whose every connection a goroutine answers
// from a, until either end closes it.
func AgentDialer(a agent.Agent) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		ours, theirs := net.Pipe()
		go func() {
			agent.ServeAgent(a, ours)
			ours.Close()
		}()
		return theirs, nil
	}
}

// ReadOnly lets a build list keys and ask for signatures, nothing else:
// no adding, removing or locking keys in the agent it was lent, and no
// extensions (as buildx does for the agents it forwards).
func ReadOnly(a agent.ExtendedAgent) agent.ExtendedAgent { return readOnly{a} }

type readOnly struct{ agent.ExtendedAgent }

var errReadOnly = errors.New("this ssh agent is lent to a build read-only: it may list keys and sign, nothing else")

func (readOnly) Add(agent.AddedKey) error                 { return errReadOnly }
func (readOnly) Remove(ssh.PublicKey) error               { return errReadOnly }
func (readOnly) RemoveAll() error                         { return errReadOnly }
func (readOnly) Lock([]byte) error                        { return errReadOnly }
func (readOnly) Unlock([]byte) error                      { return errReadOnly }
func (readOnly) Extension(string, []byte) ([]byte, error) { return nil, agent.ErrExtensionUnsupported }
