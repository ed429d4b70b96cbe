package proto

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteFrame(&buf, KindStdout, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := WriteJSON(&buf, KindExit, Exit{Code: 3}); err != nil {
		t.Fatal(err)
	}
	if err := WriteFrame(&buf, KindAck, nil); err != nil {
		t.Fatal(err)
	}
	k, p, err := ReadFrame(&buf)
	if err != nil || k != KindStdout || string(p) != "hello" {
		t.Fatalf("frame 1 = %s %q %v", k, p, err)
	}
	k, p, err = ReadFrame(&buf)
	var x Exit
	if err != nil || k != KindExit || DecodeJSON(k, p, &x) != nil || x.Code != 3 {
		t.Fatalf("frame 2 = %s %q %v", k, p, err)
	}
	if k, p, err = ReadFrame(&buf); err != nil || k != KindAck || len(p) != 0 {
		t.Fatalf("frame 3 = %s %q %v", k, p, err)
	}
	if _, _, err := ReadFrame(&buf); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
}

func TestReadFrameRejectsHugeAndTruncatedFrames(t *testing.T) {
	huge := []byte{byte(KindStdout), 0xff, 0xff, 0xff, 0xff}
	if _, _, err := ReadFrame(bytes.NewReader(huge)); err == nil || !strings.Contains(err.Error(), "limit") {
		t.Errorf("huge frame: %v", err)
	}
	cut := []byte{byte(KindStdout), 0, 0, 0, 10, 'a'}
	if _, _, err := ReadFrame(bytes.NewReader(cut)); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated frame: %v, want io.ErrUnexpectedEOF", err)
	}
	if err := WriteFrame(io.Discard, KindStdout, make([]byte, MaxFrame+1)); err == nil {
		t.Error("WriteFrame wrote an oversized frame")
	}
}

const passwd = `# comment
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:App:/home/app:/bin/sh
nohome:x:1001:1001::
broken
`

const group = `root:x:0:
app:x:1000:
extra:x:2000:someone,app
more:x:2001:app
web:x:33:
`

func TestResolveUser(t *testing.T) {
	for _, tc := range []struct {
		spec    string
		passwd  string
		group   string
		want    User
		wantErr string
	}{
		{spec: "", passwd: passwd, group: group, want: User{UID: 0, GID: 0, Home: "/root"}},
		{spec: "", want: User{Home: "/"}},
		{spec: "app", passwd: passwd, group: group, want: User{UID: 1000, GID: 1000, Groups: []uint32{2000, 2001}, Home: "/home/app"}},
		{spec: "1000", passwd: passwd, group: group, want: User{UID: 1000, GID: 1000, Groups: []uint32{2000, 2001}, Home: "/home/app"}},
		{spec: "app:web", passwd: passwd, group: group, want: User{UID: 1000, GID: 33, Home: "/home/app"}},
		{spec: "app:4242", passwd: passwd, group: group, want: User{UID: 1000, GID: 4242, Home: "/home/app"}},
		{spec: "4242", passwd: passwd, group: group, want: User{UID: 4242, GID: 0, Home: "/"}},
		{spec: "4242:33", want: User{UID: 4242, GID: 33, Home: "/"}},
		{spec: "nohome", passwd: passwd, want: User{UID: 1001, GID: 1001, Home: "/"}},
		{spec: "ghost", passwd: passwd, group: group, wantErr: "unable to find user ghost"},
		{spec: "ghost", wantErr: "unable to find user ghost"},
		{spec: "app:ghosts", passwd: passwd, group: group, wantErr: "unable to find group ghosts"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			var p, g io.Reader
			if tc.passwd != "" {
				p = strings.NewReader(tc.passwd)
			}
			if tc.group != "" {
				g = strings.NewReader(tc.group)
			}
			got, err := ResolveUser(tc.spec, p, g)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ResolveUser(%q) = %+v, want %+v", tc.spec, got, tc.want)
			}
		})
	}
}
