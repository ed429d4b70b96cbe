package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"

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
		info, err := inspectImage(ctx, &registryReader{cl: cl}, *r.JSON200)
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

const manifestAccept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"

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
func inspectImage(ctx context.Context, reg *registryReader, im api.Image) (imageInfo, error) {
	info := imageInfo{Name: im.Name, Digest: im.Digest, Type: "manifest", Attestations: []attestation{}}
	repo := im.Repository
	body, err := reg.get(ctx, repo, "manifests/"+im.Digest, manifestAccept)
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
			body, err := reg.get(ctx, repo, "manifests/"+m.Digest, manifestAccept)
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

// registryReader reads kiln's registry as an OCI client: it meets the
// registry's bearer challenge with the CLI's token and asks again.
type registryReader struct {
	cl     *client
	tokens map[string]string // repository → registry token
}

var challengeRE = regexp.MustCompile(`(\w+)="([^"]*)"`)

func (r *registryReader) get(ctx context.Context, repo, path, accept string) ([]byte, error) {
	do := func(bearer string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.cl.base+"/v2/"+repo+"/"+path, nil)
		if err != nil {
			return nil, err
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		return r.cl.http.Do(req)
	}
	if r.tokens == nil {
		r.tokens = map[string]string{}
	}
	resp, err := do(r.tokens[repo])
	if err != nil {
		return nil, fmt.Errorf("read %s from kiln's registry: %w", repo, err)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		resp.Body.Close()
		tok, err := r.token(ctx, repo, resp.Header.Get("WWW-Authenticate"))
		if err != nil {
			return nil, err
		}
		r.tokens[repo] = tok
		if resp, err = do(tok); err != nil {
			return nil, fmt.Errorf("read %s from kiln's registry: %w", repo, err)
		}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("read %s/%s from kiln's registry: %s", repo, path, resp.Status)
	}
	return body, nil
}

func (r *registryReader) token(ctx context.Context, repo, challenge string) (string, error) {
	params := map[string]string{}
	for _, m := range challengeRE.FindAllStringSubmatch(challenge, -1) {
		params[m[1]] = m[2]
	}
	if params["realm"] == "" {
		return "", fmt.Errorf("kiln's registry answered 401 without a bearer challenge (%q)", challenge)
	}
	q := url.Values{"service": {params["service"]}, "scope": {"repository:" + repo + ":pull"}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, params["realm"]+"?"+q.Encode(), nil)
	if err != nil {
		return "", err
	}
	req.SetBasicAuth("kiln", r.cl.token)
	resp, err := r.cl.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("registry token: %w", err)
	}
	defer resp.Body.Close()
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&tr) != nil {
		return "", fmt.Errorf("registry token for %s: %s", repo, resp.Status)
	}
	if tr.Token == "" {
		tr.Token = tr.AccessToken
	}
	return tr.Token, nil
}
