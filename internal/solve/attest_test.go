package solve

import "testing"

func TestAttestsBecomeFrontendAttrs(t *testing.T) {
	opt, err := solveOpt(Request{ContextDir: t.TempDir(), Attests: map[string]string{
		"provenance": "mode=max", "sbom": "generator=kiln:5000/mirror/x@sha256:" + sixtyFour}})
	if err != nil {
		t.Fatal(err)
	}
	if got := opt.FrontendAttrs["attest:provenance"]; got != "mode=max" {
		t.Errorf("attest:provenance = %q", got)
	}
	if got := opt.FrontendAttrs["attest:sbom"]; got != "generator=kiln:5000/mirror/x@sha256:"+sixtyFour {
		t.Errorf("attest:sbom = %q", got)
	}
	if _, err := solveOpt(Request{ContextDir: t.TempDir(), Attests: map[string]string{"vex": "x"}}); err == nil {
		t.Error("an unknown attestation type was accepted")
	}
	opt, _ = solveOpt(Request{ContextDir: t.TempDir()})
	for k := range opt.FrontendAttrs {
		if len(k) > 7 && k[:7] == "attest:" {
			t.Errorf("a request without attestations sets %s", k)
		}
	}
}

const sixtyFour = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
