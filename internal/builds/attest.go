package builds

import (
	"context"
	"encoding/csv"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/store"
)

// Attestations (docker buildx build --attest, --provenance, --sbom). The
// API takes buildx's --attest CSV, one entry per "attest" field:
//
//	type=provenance[,mode=min|max][,version=v0.2|v1][,disabled=true]
//	type=sbom[,generator=IMAGE][,disabled=true][,KEY=VALUE…]
//
// BuildKit then stores the result as an image index holding the image
// and an attestation manifest (vnd.docker.reference.type:
// attestation-manifest). An SBOM's scanner image is pinned here like a
// base image (kiln's registry, or its mirror) and is part of the input
// hash; without a generator it is attest.sbom_generator.

// maxAttests bounds the attest entries of one build.
const maxAttests = 8

var scanParam = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,63}$`)

// parseAttest reads one buildx --attest entry into its fields.
func parseAttest(entry string) (map[string]string, error) {
	r := csv.NewReader(strings.NewReader(entry))
	r.TrimLeadingSpace = true
	fields, err := r.Read()
	if err != nil || len(fields) == 0 {
		return nil, badRequest("attest %s is not buildx's CSV (type=provenance,mode=max or type=sbom[,generator=IMAGE])", errdefs.Quote(entry))
	}
	kv := map[string]string{}
	for _, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok || k == "" {
			return nil, badRequest("attest %s: %s is not KEY=VALUE", errdefs.Quote(entry), errdefs.Quote(f))
		}
		if _, dup := kv[k]; dup {
			return nil, badRequest("attest %s gives %s twice", errdefs.Quote(entry), k)
		}
		kv[k] = v
	}
	return kv, nil
}

// attestations validates the build's attest entries into o: the
// provenance mode, and the SBOM scanner pinned to a digest.
func (s *Service) attestations(ctx context.Context, p auth.Principal, req *Request, o *store.BuildOptions) error {
	if len(req.Attest) == 0 {
		return nil
	}
	if len(req.Attest) > maxAttests {
		return badRequest("%d attest entries; at most %d", len(req.Attest), maxAttests)
	}
	if o.Call != "" {
		return badRequest("call=check builds no image to attest: drop attest")
	}
	seen := map[string]bool{}
	for _, entry := range req.Attest {
		kv, err := parseAttest(entry)
		if err != nil {
			return err
		}
		typ := kv["type"]
		delete(kv, "type")
		if seen[typ] {
			return badRequest("attest type %s is given twice", errdefs.Quote(typ))
		}
		seen[typ] = true
		disabled := false
		if v, ok := kv["disabled"]; ok {
			if disabled, err = strconv.ParseBool(v); err != nil {
				return badRequest("attest %s: disabled=%s is not true or false", errdefs.Quote(entry), errdefs.Quote(v))
			}
			delete(kv, "disabled")
		}
		switch typ {
		case "provenance":
			mode := "min"
			for k, v := range kv {
				switch {
				case k == "mode" && (v == "min" || v == "max"):
					mode = v
				case k == "mode":
					return badRequest("attest %s: provenance mode %s is not min or max", errdefs.Quote(entry), errdefs.Quote(v))
				default:
					return badRequest("attest %s: provenance takes mode (min or max) and disabled; %s is not supported", errdefs.Quote(entry), errdefs.Quote(k))
				}
			}
			if !disabled {
				o.Provenance = mode
			}
		case "sbom":
			if disabled {
				continue
			}
			gen := kv["generator"]
			delete(kv, "generator")
			if gen == "" {
				gen = s.cfg.SBOMGenerator
			}
			if gen == "" {
				return badRequest("attest %s: name the scanner image with generator=IMAGE; this server sets no default (attest.sbom_generator)", errdefs.Quote(entry))
			}
			for k := range kv {
				if !scanParam.MatchString(k) || len(kv[k]) > 1024 {
					return badRequest("attest %s: scanner parameter %s must be a lower-case name and a value up to 1 KiB", errdefs.Quote(entry), errdefs.Quote(k))
				}
			}
			pin, err := s.pinImage(ctx, p, gen, o.Pull, "sbom generator")
			if err != nil {
				return err
			}
			o.SBOM = &store.SBOMAttest{Generator: pin.pin}
			if len(kv) > 0 {
				o.SBOM.Params = kv
			}
		default:
			return badRequest("attest type %s is not supported: use provenance or sbom", errdefs.Quote(typ))
		}
	}
	return nil
}

// attestAttrs are a build's attestations as the solve's frontend
// attributes take them (solve.Request.Attests), with the SBOM scanner at
// its pinned digest in kiln's registry.
func (s *Service) attestAttrs(o store.BuildOptions) map[string]string {
	if o.Provenance == "" && o.SBOM == nil {
		return nil
	}
	m := map[string]string{}
	if o.Provenance != "" {
		m["provenance"] = "mode=" + o.Provenance
	}
	if o.SBOM != nil {
		g := o.SBOM.Generator
		var b strings.Builder
		w := csv.NewWriter(&b)
		rec := []string{"generator=" + s.cfg.RegistryHost + "/" + g.LocalRepo + "@" + g.Digest}
		for _, k := range slices.Sorted(maps.Keys(o.SBOM.Params)) {
			rec = append(rec, k+"="+o.SBOM.Params[k])
		}
		w.Write(rec)
		w.Flush()
		m["sbom"] = strings.TrimSuffix(b.String(), "\n")
	}
	return m
}

// ensureGenerator copies a mirrored SBOM scanner into kiln's registry
// before the build runs, as fetchBases does for base images.
func (s *Service) ensureGenerator(ctx context.Context, b Build) error {
	if b.Options.SBOM == nil || b.Options.SBOM.Generator.Local {
		return nil
	}
	g := b.Options.SBOM.Generator
	s.phase(b.ID, "fetching the sbom scanner")
	return s.mirror.Ensure(ctx, mirror.Pinned{Upstream: g.Upstream, LocalRepo: g.LocalRepo, Digest: g.Digest, FromUpstream: g.FromUpstream}, nil)
}
