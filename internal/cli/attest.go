package cli

import (
	"fmt"
	"strconv"
	"strings"
)

// canonicalAttest turns --provenance / --sbom values into --attest
// entries as buildx does: true/false (any strconv.ParseBool spelling)
// enable or disable the type, anything else is its options
// (--provenance=mode=max is type=provenance,mode=max).
func canonicalAttest(typ, v string) string {
	if b, err := strconv.ParseBool(v); err == nil {
		return fmt.Sprintf("type=%s,disabled=%t", typ, !b)
	}
	return "type=" + typ + "," + v
}

// attestType is the type= of an --attest entry ("" when it has none).
func attestType(entry string) string {
	for _, f := range strings.Split(entry, ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(f), "="); ok && strings.EqualFold(k, "type") {
			return strings.ToLower(strings.Trim(v, `"`))
		}
	}
	return ""
}

// attests are the "attest" fields of a build, from --attest, --provenance
// and --sbom as buildx takes them. Like buildx, a build that pushes
// (--push) gets provenance mode=min unless it says otherwise or
// BUILDX_NO_DEFAULT_ATTESTATIONS is set; the server checks the rest.
func attests(attest []string, provenance, sbom string, push bool, lookupEnv func(string) (string, bool)) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	addOne := func(entry, flag string) error {
		typ := attestType(entry)
		switch typ {
		case "provenance", "sbom":
		case "":
			return fmt.Errorf("%s %q has no type=: use type=provenance[,mode=min|max] or type=sbom[,generator=IMAGE]", flag, entry)
		default:
			return fmt.Errorf("%s %q: attestation type %q is not provenance or sbom", flag, entry, typ)
		}
		if seen[typ] {
			return fmt.Errorf("the %s attestation is given twice (--attest type=%s and --%s are the same thing)", typ, typ, typ)
		}
		seen[typ] = true
		out = append(out, entry)
		return nil
	}
	for _, a := range attest {
		if err := addOne(strings.TrimSpace(a), "--attest"); err != nil {
			return nil, err
		}
	}
	if provenance != "" {
		if err := addOne(canonicalAttest("provenance", provenance), "--provenance"); err != nil {
			return nil, err
		}
	}
	if sbom != "" {
		if err := addOne(canonicalAttest("sbom", sbom), "--sbom"); err != nil {
			return nil, err
		}
	}
	if push && !seen["provenance"] {
		if v, ok := lookupEnv("BUILDX_NO_DEFAULT_ATTESTATIONS"); !ok || !truthy(v) {
			out = append(out, "type=provenance,mode=min")
		}
	}
	return out, nil
}

func truthy(v string) bool {
	b, err := strconv.ParseBool(v)
	return err == nil && b || err != nil && v != ""
}
