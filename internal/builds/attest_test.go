package builds

import (
	"context"
	"errors"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
)

func TestParseAttestReadsBuildxCSV(t *testing.T) {
	kv, err := parseAttest(`type=sbom,generator=kiln/scan:1,"scan-context=true"`)
	if err != nil || kv["type"] != "sbom" || kv["generator"] != "kiln/scan:1" || kv["scan-context"] != "true" {
		t.Fatalf("parseAttest = %v, %v", kv, err)
	}
	for _, bad := range []string{"", "type", "type=sbom,type=sbom", `type="sbom`} {
		if _, err := parseAttest(bad); err == nil {
			t.Errorf("parseAttest(%q) accepted", bad)
		}
	}
}

// Attestations are validated at submission (400 for a mistake), the SBOM
// scanner is pinned to its digest, and they enter the input hash only
// when asked for, so a build asking for other attestations is never
// answered by one without them.
func TestAttestationsValidatePinAndHash(t *testing.T) {
	f := newFixture(t, 2)
	s, _ := f.service()
	ctx := context.Background()
	scanner, err := pushImage(ctx, f.reg, "team-a/scan", "1", "scanner")
	if err != nil {
		t.Fatal(err)
	}
	p := principal("attest")
	plain, err := submit(t, s, p, Request{})
	if err != nil {
		t.Fatal(err)
	}
	hashes := map[string]string{plain.InputHash: "plain"}
	for _, c := range []struct {
		name   string
		attest []string
	}{
		{"min", []string{"type=provenance"}},
		{"max", []string{"type=provenance,mode=max"}},
		{"sbom", []string{"type=sbom,generator=kiln.test:5000/team-a/scan:1"}},
		{"sbom with a parameter", []string{"type=sbom,generator=kiln.test:5000/team-a/scan:1,scan-context=true"}},
	} {
		b, err := submit(t, s, p, Request{Attest: c.attest})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if b.InputHash == "" || hashes[b.InputHash] != "" {
			t.Errorf("%s: input hash %q is empty or that of %s", c.name, b.InputHash, hashes[b.InputHash])
		}
		hashes[b.InputHash] = c.name
		if b.DedupOf != "" {
			t.Errorf("%s: answered by %s", c.name, b.DedupOf)
		}
	}
	b, err := submit(t, s, p, Request{Attest: []string{"type=provenance,mode=max", "type=sbom,generator=team-a/scan:1"}})
	if err == nil {
		t.Fatal("a generator without kiln's host resolved through a mirror this server does not have")
	}
	b, err = submit(t, s, p, Request{Attest: []string{"type=provenance,mode=max", "type=sbom,generator=kiln.test:5000/team-a/scan:1"}})
	if err != nil {
		t.Fatal(err)
	}
	o := b.Options
	if o.Provenance != "max" || o.SBOM == nil || o.SBOM.Generator.Digest != scanner || !o.SBOM.Generator.Local {
		t.Fatalf("options %+v (sbom %+v), want provenance max and the scanner at %s", o, o.SBOM, scanner)
	}
	attrs := s.attestAttrs(o)
	if attrs["provenance"] != "mode=max" || attrs["sbom"] != "generator=kiln.test:5000/team-a/scan@"+scanner {
		t.Errorf("solve attests = %v", attrs)
	}
	if b, err := submit(t, s, p, Request{Attest: []string{"type=provenance,disabled=true"}}); err != nil || b.Options.Provenance != "" || b.InputHash != plain.InputHash {
		t.Errorf("disabled provenance: %v, options %+v, hash %s (plain %s)", err, b.Options, b.InputHash, plain.InputHash)
	}

	// type=sbom without a generator takes the server's default scanner.
	s.cfg.SBOMGenerator = "kiln.test:5000/team-a/scan:1"
	if b, err := submit(t, s, p, Request{Attest: []string{"type=sbom,disabled=false"}}); err != nil || b.Options.SBOM == nil || b.Options.SBOM.Generator.Digest != scanner {
		t.Errorf("default generator: %v, options %+v", err, b.Options)
	}
	s.cfg.SBOMGenerator = ""

	for _, bad := range []Request{
		{Attest: []string{"type=provenance,mode=full-ish"}},
		{Attest: []string{"type=provenance,builder-id=x"}},
		{Attest: []string{"type=vex"}},
		{Attest: []string{"type=sbom"}}, // no generator, and no default here
		{Attest: []string{"type=provenance", "type=provenance,mode=max"}},
		{Attest: []string{"type=sbom,generator=kiln.test:5000/team-b/scan:1"}},
		{Attest: []string{"type=provenance"}, Call: "check"},
	} {
		if _, err := submit(t, s, p, bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%v: %v, want invalid", bad.Attest, err)
		}
	}
}
