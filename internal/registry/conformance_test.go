package registry_test

import (
	"context"
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/testkit"
)

// conformancePkg is the OCI distribution-spec conformance suite, pinned in
// go.mod by a tool directive (v1.1, with referrers, subject, sha512 and
// non-distributable data).
const conformancePkg = "github.com/opencontainers/distribution-spec/conformance"

// expectedSkips are the suite's tests that kiln's registry answers with
// the fallback the spec allows, which the suite reports as skipped rather
// than passed, each with why. The test asserts exactly this set, so a
// feature that starts falling back shows up as a new skip.
var expectedSkips = map[string]string{
	// A monolithic upload in the POST body is optional; distribution
	// opens an upload session (202) and the client PUTs the content.
	"OCI Conformance Test/sha256 blobs/post only/blob-post-only":            "POST with content: falls back to POST+PUT",
	"OCI Conformance Test/sha256 blobs/bad digest post only/blob-post-only": "POST with content: falls back to POST+PUT",
	"OCI Conformance Test/sha512 blobs/post only/blob-post-only":            "POST with content: falls back to POST+PUT",
	"OCI Conformance Test/sha512 blobs/bad digest post only/blob-post-only": "POST with content: falls back to POST+PUT",
	// A mount without from= is optional: kiln would have to find a
	// repository holding the blob that the token may pull; it opens an
	// upload session instead.
	"OCI Conformance Test/sha256 blobs/mount anonymous/blob-mount-anonymous": "mount without from: falls back to POST+PUT",
	"OCI Conformance Test/sha512 blobs/mount anonymous/blob-mount-anonymous": "mount without from: falls back to POST+PUT",
}

// TestConformance runs the OCI distribution-spec conformance suite, every
// API and data area on, against a kiln registry on loopback with token
// auth (the suite logs in with a kiln token as password, as docker does),
// and fails on any failure, and on any skip not in expectedSkips. Set
// KILN_CONFORMANCE to a prebuilt suite binary to skip building it.
func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("conformance suite: not in -short")
	}
	bin := os.Getenv("KILN_CONFORMANCE")
	if bin == "" {
		root, err := testkit.RepoRoot()
		if err != nil {
			t.Fatal(err)
		}
		bin = filepath.Join(t.TempDir(), "conformance")
		cmd := exec.Command("go", "build", "-o", bin, conformancePkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", conformancePkg, err, out)
		}
	}
	r := testkit.StartKilnRegistry(t)
	tok, err := r.Authority.Issue(auth.TokenSpec{Subject: "conformance", Namespace: "conformance",
		Scopes: []auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	results := t.TempDir()
	// The suite reads its configuration file first; everything is set
	// below in its environment.
	if err := os.WriteFile(filepath.Join(results, "oci-conformance.yaml"), []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Dir = results
	cmd.Env = append(os.Environ(),
		"OCI_CONFIGURATION="+filepath.Join(results, "oci-conformance.yaml"),
		"OCI_RESULTS_DIR="+results,
		"OCI_VERSION=1.1",
		"OCI_LOG=error",
		"OCI_REGISTRY="+strings.TrimPrefix(r.URL, "http://"),
		"OCI_TLS=disabled",
		"OCI_REPO1=conformance/repo1",
		"OCI_REPO2=conformance/repo2",
		"OCI_USERNAME=kiln",
		"OCI_PASSWORD="+tok.Token,
		// Every API and data area the suite has, the optional ones too.
		"OCI_API_PULL=true", "OCI_API_PUSH=true",
		"OCI_API_BLOBS_ATOMIC=true", "OCI_API_BLOBS_DELETE=true", "OCI_API_BLOBS_DIGEST_HEADER=true",
		"OCI_API_BLOBS_MOUNT_ANONYMOUS=true", "OCI_API_BLOBS_UPLOAD_CANCEL=true",
		"OCI_API_MANIFESTS_ATOMIC=true", "OCI_API_MANIFESTS_DELETE=true", "OCI_API_MANIFESTS_DIGEST_HEADER=true",
		"OCI_API_TAGS_ATOMIC=true", "OCI_API_TAGS_DELETE=true", "OCI_API_TAGS_LIST=true",
		"OCI_API_REFERRER=true",
		"OCI_DATA_IMAGE=true", "OCI_DATA_INDEX=true", "OCI_DATA_INDEX_LIST=true",
		"OCI_DATA_ARTIFACT=true", "OCI_DATA_SUBJECT=true", "OCI_DATA_SUBJECT_MISSING=true",
		"OCI_DATA_ARTIFACT_LIST=true", "OCI_DATA_SUBJECT_LIST=true", "OCI_DATA_DATA_FIELD=true",
		"OCI_DATA_NONDISTRIBUTABLE=true", "OCI_DATA_CUSTOM_FIELDS=true", "OCI_DATA_NO_LAYERS=true",
		"OCI_DATA_EMPTY_BLOB=true", "OCI_DATA_SHA512=true",
		// Disabled: a manifest whose blobs were never pushed (sparse) is
		// refused by design, and pushing by digest with ?tag= is a
		// post-1.1 proposal.
		"OCI_DATA_SPARSE=false", "OCI_API_MANIFESTS_TAG_PARAM=false",
	)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("conformance suite timed out: %s", tail(out))
	}
	raw, rerr := os.ReadFile(filepath.Join(results, "junit.xml"))
	if rerr != nil {
		t.Fatalf("conformance suite (%v) wrote no report: %v\n%s", err, rerr, tail(out))
	}
	var rep struct {
		Suites []struct {
			Cases []struct {
				Name   string `xml:"name,attr"`
				Status string `xml:"status,attr"`
				Errs   string `xml:"system-out"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("parse junit.xml: %v", err)
	}
	var pass, fail, total int
	var skipped []string
	for _, s := range rep.Suites {
		for _, c := range s.Cases {
			total++
			switch c.Status {
			case "failure", "error":
				fail++
				t.Errorf("conformance: %s failed: %s", c.Name, c.Errs)
			case "skipped":
				skipped = append(skipped, c.Name)
				if _, ok := expectedSkips[c.Name]; !ok {
					t.Errorf("conformance: %s skipped: %s", c.Name, c.Errs)
				}
			case "passed":
				pass++
			default:
				t.Errorf("conformance: %s has status %q", c.Name, c.Status)
			}
		}
	}
	t.Logf("conformance: %d pass / %d fail / %d skip of %d", pass, fail, len(skipped), total)
	if total == 0 {
		t.Fatalf("conformance suite ran no test (%v):\n%s", err, tail(out))
	}
	for name := range expectedSkips {
		if !slices.Contains(skipped, name) {
			t.Errorf("conformance: %s is no longer skipped; drop it from expectedSkips", name)
		}
	}
	if t.Failed() {
		t.Logf("suite output:\n%s", tail(out))
	}
}

// tail is the end of a long output, enough to see the summary.
func tail(b []byte) string {
	const max = 8000
	if len(b) > max {
		return "...\n" + string(b[len(b)-max:])
	}
	return string(b)
}
