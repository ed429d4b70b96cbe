package runner

import (
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-build/kiln/internal/rootfs"
)

func TestCommandFollowsDocker(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  rootfs.ImageConfig
		args []string
		want []string
	}{
		{"cmd only", rootfs.ImageConfig{Cmd: []string{"sh", "-c", "x"}}, nil, []string{"sh", "-c", "x"}},
		{"args replace cmd", rootfs.ImageConfig{Cmd: []string{"sh"}}, []string{"echo", "hi"}, []string{"echo", "hi"}},
		{"entrypoint stays", rootfs.ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"--help"}}, []string{"--port", "80"}, []string{"/app", "--port", "80"}},
		{"entrypoint and cmd", rootfs.ImageConfig{Entrypoint: []string{"/app"}, Cmd: []string{"--help"}}, nil, []string{"/app", "--help"}},
		{"nothing", rootfs.ImageConfig{}, nil, []string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := command(tc.cfg, tc.args)
			if len(got) == 0 && len(tc.want) == 0 {
				return
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("command = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestEnviron(t *testing.T) {
	got, err := environ([]string{"A=1", "PATH=/bin", "B=2"}, []string{"B=3", "C=4", "A="}, "h1")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"HOSTNAME=h1", "A=", "PATH=/bin", "B=3", "C=4"}; !reflect.DeepEqual(got, want) {
		t.Errorf("environ = %q, want %q", got, want)
	}
	got, err = environ([]string{"HOSTNAME=mine"}, nil, "h1")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"PATH=" + DefaultPath, "HOSTNAME=mine"}; !reflect.DeepEqual(got, want) {
		t.Errorf("environ = %q, want %q", got, want)
	}
	if _, err := environ(nil, []string{"=x"}, "h"); err == nil {
		t.Error("an entry without a key was accepted")
	}
}

func TestStopSignal(t *testing.T) {
	for in, want := range map[string]unix.Signal{"": unix.SIGTERM, "SIGINT": unix.SIGINT, "quit": unix.SIGQUIT, "9": unix.SIGKILL,
		"SIGRTMIN+3": 37, "RTMIN": 34, "SIGRTMAX-2": 62, "SIGRTMAX": 64} {
		got, err := stopSignal(in)
		if err != nil || got != want {
			t.Errorf("stopSignal(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"SIGNOPE", "0", "65", "-1", "SIGRTMIN+31", "SIGRTMIN-1", "SIGRTMAX+1", "RTMIN+x"} {
		if _, err := stopSignal(bad); err == nil {
			t.Errorf("stopSignal(%q) accepted", bad)
		}
	}
}
