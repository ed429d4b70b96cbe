package cli

import (
	"slices"
	"testing"
)

func TestAttestFlagsAsBuildx(t *testing.T) {
	none := func(string) (string, bool) { return "", false }
	for _, c := range []struct {
		name       string
		attest     []string
		prov, sbom string
		push       bool
		env        func(string) (string, bool)
		want       []string
		err        bool
	}{
		{name: "nothing", want: nil},
		{name: "push defaults to min", push: true, want: []string{"type=provenance,mode=min"}},
		{name: "opt out of the default", push: true, env: func(k string) (string, bool) { return "1", k == "BUILDX_NO_DEFAULT_ATTESTATIONS" }},
		{name: "provenance true", prov: "true", want: []string{"type=provenance,disabled=false"}},
		{name: "provenance false wins over the push default", prov: "false", push: true, want: []string{"type=provenance,disabled=true"}},
		{name: "provenance mode", prov: "mode=max", want: []string{"type=provenance,mode=max"}},
		{name: "sbom generator", sbom: "generator=kiln/scan:1", want: []string{"type=sbom,generator=kiln/scan:1"}},
		{name: "sbom true", sbom: "1", want: []string{"type=sbom,disabled=false"}},
		{name: "generic", attest: []string{"type=provenance,mode=max", "type=sbom"}, want: []string{"type=provenance,mode=max", "type=sbom"}},
		{name: "twice", attest: []string{"type=provenance,mode=max"}, prov: "true", err: true},
		{name: "no type", attest: []string{"mode=max"}, err: true},
		{name: "unknown type", attest: []string{"type=vex"}, err: true},
	} {
		env := c.env
		if env == nil {
			env = none
		}
		got, err := attests(c.attest, c.prov, c.sbom, c.push, env)
		if (err != nil) != c.err {
			t.Errorf("%s: err %v, want error %t", c.name, err, c.err)
			continue
		}
		if !c.err && !slices.Equal(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
