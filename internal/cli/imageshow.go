package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
)

// imageShowCommand is kiln images show NAME: the image's digest, its
// platforms and its attestations (provenance, SBOM), read from kiln's
// registry as any OCI client reads them.
func imageShowCommand(g *globals) *cobra.Command {
	show := &cobra.Command{
		Use:   "show NAME",
		Short: "Show an image's digest, platforms and attestations (provenance, SBOM)",
		Args:  exactArgs("NAME"),
	}
	var asJSON bool
	show.Flags().BoolVar(&asJSON, "json", false, "print the image's digest, platforms and attestations as one JSON object")
	show.RunE = g.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
		cl, err := g.client(cmd)
		if err != nil {
			return err
		}
		r, err := cl.api.GetImageWithResponse(ctx, args[0])
		if err != nil {
			return cl.transportError(ctx, "show image "+args[0], err)
		}
		if err := cl.check(r.HTTPResponse, r.Body); err != nil {
			return err
		}
		if r.JSON200 == nil {
			return fmt.Errorf("show image %s: server answered %d without the image", args[0], r.StatusCode())
		}
		info, err := inspectImage(ctx, cl, *r.JSON200)
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(cmd.OutOrStdout(), info)
		}
		printImageInfo(cmd.OutOrStdout(), info)
		return nil
	})
	return show
}

// manifestDoc is the union of what an image manifest and an index hold
// that images show prints.
type manifestDoc struct {
	MediaType string `json:"mediaType"`
	Manifests []struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int64  `json:"size"`
		Platform  *struct {
			OS           string `json:"os"`
			Architecture string `json:"architecture"`
			Variant      string `json:"variant"`
		} `json:"platform"`
		Annotations map[string]string `json:"annotations"`
	} `json:"manifests"`
	Config *struct {
		Digest string `json:"digest"`
	} `json:"config"`
	Layers []struct {
		Digest      string            `json:"digest"`
		Size        int64             `json:"size"`
		Annotations map[string]string `json:"annotations"`
	} `json:"layers"`
}

// imageInfo is what images show prints, as a table or as JSON.
type imageInfo struct {
	Name         string          `json:"name"`
	Digest       string          `json:"digest"`
	Type         string          `json:"type"` // index or manifest
	Platforms    []platformEntry `json:"platforms,omitempty"`
	Attestations []attestation   `json:"attestations"`
}

type platformEntry struct {
	Platform string `json:"platform"`
	Digest   string `json:"digest"`
}

type attestation struct {
	Digest     string      `json:"digest"`
	For        string      `json:"for"`
	Predicates []predicate `json:"predicates"`
}

type predicate struct {
	Type   string `json:"type"`
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// inspectImage reads im's manifest (and its attestation manifests) from
// kiln's registry.
func inspectImage(ctx context.Context, cl *client, im api.Image) (imageInfo, error) {
	info := imageInfo{Name: im.Name, Digest: im.Digest, Type: "manifest", Attestations: []attestation{}}
	repo := im.Repository
	body, _, err := cl.readManifest(ctx, repo, im.Digest)
	if err != nil {
		return info, err
	}
	var doc manifestDoc
	if err := json.Unmarshal(body, &doc); err != nil {
		return info, fmt.Errorf("image %s: its manifest is not JSON: %v", im.Name, err)
	}
	if len(doc.Manifests) == 0 {
		return info, nil
	}
	info.Type = "index"
	for _, m := range doc.Manifests {
		if m.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
			body, _, err := cl.readManifest(ctx, repo, m.Digest)
			if err != nil {
				return info, err
			}
			var am manifestDoc
			if err := json.Unmarshal(body, &am); err != nil {
				return info, fmt.Errorf("attestation manifest %s is not JSON: %v", m.Digest, err)
			}
			a := attestation{Digest: m.Digest, For: m.Annotations["vnd.docker.reference.digest"], Predicates: []predicate{}}
			for _, l := range am.Layers {
				a.Predicates = append(a.Predicates, predicate{Type: l.Annotations["in-toto.io/predicate-type"], Digest: l.Digest, Size: l.Size})
			}
			info.Attestations = append(info.Attestations, a)
			continue
		}
		p := "unknown"
		if m.Platform != nil {
			p = m.Platform.OS + "/" + m.Platform.Architecture
			if m.Platform.Variant != "" {
				p += "/" + m.Platform.Variant
			}
		}
		info.Platforms = append(info.Platforms, platformEntry{Platform: p, Digest: m.Digest})
	}
	return info, nil
}

func printImageInfo(w io.Writer, info imageInfo) {
	fmt.Fprintf(w, "Name:      %s\n", info.Name)
	fmt.Fprintf(w, "Digest:    %s\n", info.Digest)
	if info.Type == "manifest" {
		fmt.Fprintf(w, "Type:      image manifest\n")
		fmt.Fprintf(w, "Platforms: %s\n", "(one image; see its config)")
		fmt.Fprintf(w, "Attestations: none\n")
		return
	}
	fmt.Fprintf(w, "Type:      image index\n")
	fmt.Fprintln(w, "Platforms:")
	for _, p := range info.Platforms {
		fmt.Fprintf(w, "  %-14s %s\n", p.Platform, p.Digest)
	}
	if len(info.Attestations) == 0 {
		fmt.Fprintln(w, "Attestations: none")
		return
	}
	fmt.Fprintln(w, "Attestations:")
	for _, a := range info.Attestations {
		fmt.Fprintf(w, "  %s for %s\n", a.Digest, a.For)
		for _, p := range a.Predicates {
			fmt.Fprintf(w, "    %-32s %s (%d bytes)\n", p.Type, p.Digest, p.Size)
		}
	}
}
