// Package proto is the wire protocol between internal/runner on the host
// and kiln-init's run mode in the guest, plus the parts of the run spec
// the guest interprets (user lookup). It has no dependencies beyond the
// standard library so the static /init stays small. The protocol is
// described in internal/runner's package documentation.
package proto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Boot contract of run mode.
const (
	// Port is the virtio-serial port that carries the run protocol.
	Port = "kiln.run"
	// ImageSerial is the virtio-blk serial of the image's root filesystem.
	ImageSerial = "kiln-image"
	// ModeParam and ImageParam are the kernel command line keys that put
	// kiln-init in run mode and name the image disk.
	ModeParam  = "kiln.mode"
	ModeRun    = "run"
	ImageParam = "kiln.image"

	// Name and Version identify the protocol in the guest's hello. Version
	// changes on any incompatible change.
	Name    = "kiln-run"
	Version = 1

	// MaxFrame bounds a frame's payload. The guest runs arbitrary code as
	// root, so the host never trusts a length it did not bound.
	MaxFrame = 1 << 20
)

// Kind is the first byte of a frame.
type Kind byte

// Frame kinds. Guest → host: Hello, Stdout, Stderr, Exit. Host → guest:
// Spec, Signal, Ack.
const (
	KindHello  Kind = 'h'
	KindStdout Kind = 'o'
	KindStderr Kind = 'e'
	KindExit   Kind = 'x'
	KindSpec   Kind = 's'
	KindSignal Kind = 'k'
	KindAck    Kind = 'a'
)

func (k Kind) String() string {
	switch k {
	case KindHello:
		return "hello"
	case KindStdout:
		return "stdout"
	case KindStderr:
		return "stderr"
	case KindExit:
		return "exit"
	case KindSpec:
		return "spec"
	case KindSignal:
		return "signal"
	case KindAck:
		return "ack"
	}
	return fmt.Sprintf("unknown(%#x)", byte(k))
}

// Hello is the guest's first frame, sent once it has opened the port.
type Hello struct {
	Proto   string `json:"proto"`
	Version int    `json:"version"`
	// Kernel is the guest's kernel release, for error messages.
	Kernel string `json:"kernel,omitempty"`
}

// Spec is what to run: the host has already applied the image config,
// the overrides and Docker's entrypoint/cmd rules.
type Spec struct {
	// Argv is the command; Argv[0] is looked up in the PATH of Env when
	// it has no slash.
	Argv []string `json:"argv"`
	// Env is the complete environment except HOME, which the guest sets
	// from the user's passwd entry when it is missing.
	Env []string `json:"env"`
	// WorkingDir is absolute; it is created when missing.
	WorkingDir string `json:"workingDir"`
	// User is as in an image config: "", "name", "uid", with ":group" or
	// ":gid" optionally; names resolve in the image's /etc/passwd and
	// /etc/group.
	User     string `json:"user,omitempty"`
	Hostname string `json:"hostname"`
}

// Signal asks the guest to send a signal to the process.
type Signal struct {
	Signal int `json:"signal"`
}

// Exit is the guest's last frame.
type Exit struct {
	// Code is the exit status, 128+n when the process was killed by
	// signal n, or the status a shell would give when it could not start
	// (127 not found, 126 not executable, 125 anything else).
	Code int `json:"code"`
	// Signal names the signal that killed the process, if any.
	Signal string `json:"signal,omitempty"`
	// Error is set when the process could not be started; it says why.
	Error string `json:"error,omitempty"`
}

// WriteFrame writes one frame in a single Write, so frames from writers
// serialized by the caller never interleave.
func WriteFrame(w io.Writer, k Kind, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("%s frame of %d bytes exceeds the %d byte limit", k, len(payload), MaxFrame)
	}
	buf := make([]byte, 5+len(payload))
	buf[0] = byte(k)
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	copy(buf[5:], payload)
	_, err := w.Write(buf)
	return err
}

// WriteJSON writes v as the payload of a frame.
func WriteJSON(w io.Writer, k Kind, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s frame: %w", k, err)
	}
	return WriteFrame(w, k, b)
}

// ReadFrame reads one frame. It reads exactly the frame's bytes, so
// nothing behind it is consumed. A clean end of stream between frames is
// io.EOF; inside a frame it is io.ErrUnexpectedEOF.
func ReadFrame(r io.Reader) (Kind, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	k := Kind(hdr[0])
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("%s frame of %d bytes exceeds the %d byte limit", k, n, MaxFrame)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, fmt.Errorf("read %s frame: %w", k, err)
	}
	return k, payload, nil
}

// DecodeJSON decodes a frame payload, naming the frame in the error.
func DecodeJSON(k Kind, payload []byte, v any) error {
	if err := json.Unmarshal(payload, v); err != nil {
		return fmt.Errorf("decode %s frame: %w", k, err)
	}
	return nil
}
