package registry

// OCI distribution-spec v1.1 on top of distribution v3.1.2, which has
// none of it: the referrers API, the OCI-Subject answer to a manifest push
// with a subject, and sha512 digests for blobs and manifests.
//
// The referrers index is kept through the storage driver, per repository,
// under repositories/<name>/_referrers/<subject alg>/<subject hex>/<alg>/<hex>,
// one small JSON descriptor per referrer, written by indexReferrer for
// every manifest with a subject that enters the repository: pushed over
// the API, linked by Tag, stored by PutManifest. Manifests stored before
// the index existed (a data dir of an older kiln) are indexed by
// backfillReferrers, once per repository, on its first referrers query.
// The index is read back through the manifest store: an entry whose
// manifest is gone (deleted over the API, or its tag deleted by kiln) is
// left out and removed, so the answer follows deletes without having to
// hook each one. Registry GC (distribution's mark and sweep) keeps every
// manifest a repository still links, so a signature or attestation of an
// image stays as long as it is not deleted itself, whether or not it is
// tagged; deleting a subject leaves its referrers (the spec leaves that to
// the registry, and cosign/notation users expect signatures to outlive a
// re-tag).
//
// sha512: distribution stores every blob under its sha256 and links the
// sha512 name to it, but answers with the sha256. kiln rewrites the
// answer's Docker-Content-Digest and Location to the digest the client
// asked by. A cross-repository mount by sha512 makes distribution link
// the sha512 name to itself, where nothing is stored; kiln links it to
// the sha256 the source's link names instead, and the sha256 too (the
// blob GET serves the sha256 through the repository's own link).
// Manifests pushed by a sha512 digest are stored under their sha256 with
// an alias, the sha512 revision link holding the sha256, that GET, HEAD
// and DELETE by sha512 go through.

import (
	"bytes"
	"context"
	_ "crypto/sha512" // sha512 digests
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"regexp"
	"strings"

	dauth "github.com/distribution/distribution/v3/registry/auth"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

var (
	referrersPath = regexp.MustCompile(`^/v2/(.+)/referrers/([^/]+)$`)
	blobPath      = regexp.MustCompile(`^/v2/(.+)/blobs/([^/]+)$`)
	uploadPath    = regexp.MustCompile(`^/v2/(.+)/blobs/uploads/([^/]*)$`)
)

func repoDir(name string) string { return storageDir("repositories") + "/" + name }

func referrersDir(repo string, subject digest.Digest) string {
	return repoDir(repo) + "/_referrers/" + subject.Algorithm().String() + "/" + subject.Encoded()
}

// aliasPath is the revision link of manifest d in repo, as distribution
// lays it out; for a digest other than sha256 it holds the sha256 the
// manifest is stored under, which distribution follows on reads.
func aliasPath(repo string, d digest.Digest) string {
	return repoDir(repo) + "/_manifests/revisions/" + d.Algorithm().String() + "/" + d.Encoded() + "/link"
}

// blobLinkPath is the link of blob d in repo.
func blobLinkPath(repo string, d digest.Digest) string {
	return repoDir(repo) + "/_layers/" + d.Algorithm().String() + "/" + d.Encoded() + "/link"
}

// linkBlobAlias makes blob d of repo, stored under its sha256 canon, GET
// by both names, as an upload by d links it: distribution's blob GET
// looks d up, then serves canon through repo's own link to canon.
func (r *Registry) linkBlobAlias(ctx context.Context, repo string, d, canon digest.Digest) error {
	if err := r.writeLink(ctx, blobLinkPath(repo, canon), canon); err != nil {
		return fmt.Errorf("link blob %s into %s: %w", canon, repo, err)
	}
	if err := r.writeLink(ctx, blobLinkPath(repo, d), canon); err != nil {
		return fmt.Errorf("link blob %s into %s as %s: %w", canon, repo, d, err)
	}
	return nil
}

// fixMountedAlias repairs what distribution's mount of blob d (not a
// sha256) from repository from into repo leaves: a link of d to d, where
// nothing is stored. from's own link says which sha256 holds the data.
// It does nothing when from does not hold d (then nothing was mounted).
func (r *Registry) fixMountedAlias(ctx context.Context, from, repo string, d digest.Digest) error {
	link, err := r.readLink(ctx, blobLinkPath(from, d))
	if err != nil {
		return fmt.Errorf("read the link of blob %s in %s: %w", d, from, err)
	}
	if link == "" {
		return nil
	}
	canon, err := digest.Parse(link)
	if err != nil || canon == d {
		return nil // not an alias: distribution's link is right
	}
	return r.linkBlobAlias(ctx, repo, d, canon)
}

// oci11 serves what distribution lacks, or adjusts req and w so that
// distribution's answer is right; it reports whether it answered req.
func (r *Registry) oci11(w http.ResponseWriter, req *http.Request) (http.ResponseWriter, *http.Request, bool) {
	p := req.URL.Path
	if m := referrersPath.FindStringSubmatch(p); m != nil && (req.Method == http.MethodGet || req.Method == http.MethodHead) {
		r.serveReferrers(w, req, m[1], m[2])
		return w, req, true
	}
	if m := manifestPath.FindStringSubmatch(p); m != nil {
		return r.manifest11(w, req, m[1], m[2])
	}
	// Blobs by sha512: answer with the digest asked for.
	var asked string
	if m := blobPath.FindStringSubmatch(p); m != nil && m[2] != "uploads" {
		asked = m[2]
	} else if uploadPath.MatchString(p) {
		asked = req.URL.Query().Get("digest")
		if asked == "" {
			asked = req.URL.Query().Get("mount")
		}
	}
	if d, err := digest.Parse(asked); err == nil && d.Algorithm() != digest.SHA256 {
		rw := &digestRewriter{ResponseWriter: w, want: d}
		if m := uploadPath.FindStringSubmatch(p); m != nil && req.Method == http.MethodPost {
			repo, from := m[1], req.URL.Query().Get("from")
			rw.before = func() error {
				canon, err := digest.Parse(rw.canon)
				if err == nil && canon != d {
					return r.linkBlobAlias(context.WithoutCancel(req.Context()), repo, d, canon)
				}
				if from == "" {
					return nil // a new upload session: its PUT links the blob
				}
				return r.fixMountedAlias(context.WithoutCancel(req.Context()), from, repo, d)
			}
		}
		return rw, req, false
	}
	return w, req, false
}

// authorize checks req's token for access to repo as distribution's
// handlers would, answering the challenge itself when it falls short.
func (r *Registry) authorize(w http.ResponseWriter, req *http.Request, repo string, actions ...string) bool {
	var wanted []dauth.Access
	for _, a := range actions {
		wanted = append(wanted, dauth.Access{Resource: dauth.Resource{Type: "repository", Name: repo}, Action: a})
	}
	_, err := r.access.Authorized(req, wanted...)
	if err == nil {
		return true
	}
	var ch challenge
	if errors.As(err, &ch) {
		ch.SetHeaders(req, w)
	}
	writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
	return false
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
}

// serveReferrers answers GET /v2/<repo>/referrers/<digest>.
func (r *Registry) serveReferrers(w http.ResponseWriter, req *http.Request, repo, ref string) {
	if !r.authorize(w, req, repo, "pull") {
		return
	}
	subject, err := digest.Parse(ref)
	if err != nil {
		writeError(w, http.StatusBadRequest, "DIGEST_INVALID", "the referrers API takes a digest, not "+ref)
		return
	}
	descs, err := r.Referrers(req.Context(), repo, subject.String())
	if err != nil && !errors.Is(err, ErrNotFound) {
		writeError(w, http.StatusInternalServerError, "UNKNOWN", err.Error())
		return
	}
	if at := req.URL.Query().Get("artifactType"); at != "" {
		kept := descs[:0]
		for _, d := range descs {
			if d.ArtifactType == at {
				kept = append(kept, d)
			}
		}
		descs = kept
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	if descs == nil {
		descs = []v1.Descriptor{}
	}
	body, _ := json.Marshal(v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: descs})
	w.Header().Set("Content-Type", v1.MediaTypeImageIndex)
	w.Header().Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(http.StatusOK)
	if req.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

// Referrers lists the manifests of repo whose subject is the manifest
// subjectDigest, as descriptors with their artifactType and annotations.
// Entries of manifests no longer in repo are dropped from the index.
func (r *Registry) Referrers(ctx context.Context, repo, subjectDigest string) ([]v1.Descriptor, error) {
	subject, err := digest.Parse(subjectDigest)
	if err != nil {
		return nil, fmt.Errorf("referrers of %s: %w", subjectDigest, err)
	}
	rp, err := r.repository(ctx, repo)
	if err != nil {
		return nil, fmt.Errorf("referrers of %s in %s: %w", subject, repo, err)
	}
	ms, err := rp.Manifests(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.backfillReferrers(ctx, repo); err != nil {
		return nil, err
	}
	dir := referrersDir(repo, subject)
	var out []v1.Descriptor
	algs, err := r.driver.List(ctx, dir)
	if isMissing(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("referrers of %s in %s: %w", subject, repo, err)
	}
	for _, a := range algs {
		entries, err := r.driver.List(ctx, a)
		if err != nil && !isMissing(err) {
			return nil, fmt.Errorf("referrers of %s in %s: %w", subject, repo, err)
		}
		for _, e := range entries {
			raw, err := r.driver.GetContent(ctx, e)
			if isMissing(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("referrers of %s in %s: %w", subject, repo, err)
			}
			var d v1.Descriptor
			if err := json.Unmarshal(raw, &d); err != nil {
				return nil, fmt.Errorf("referrers of %s in %s: entry %s: %w", subject, repo, e, err)
			}
			ok, err := r.manifestExists(ctx, repo, ms, d.Digest)
			if err != nil {
				return nil, err
			}
			if !ok {
				// Deleted since it was indexed.
				_ = r.driver.Delete(ctx, e)
				continue
			}
			out = append(out, d)
		}
	}
	return out, nil
}

// manifestExists reports whether repo holds manifest d, by its alias for
// a digest other than sha256.
func (r *Registry) manifestExists(ctx context.Context, repo string, ms interface {
	Exists(context.Context, digest.Digest) (bool, error)
}, d digest.Digest) (bool, error) {
	if d.Algorithm() != digest.SHA256 {
		canon, err := r.alias(ctx, repo, d)
		if err != nil || canon == "" {
			return false, err
		}
		d = canon
	}
	ok, err := ms.Exists(ctx, d)
	if err != nil && errors.Is(mapNotFound(err), ErrNotFound) {
		return false, nil
	}
	return ok, err
}

// alias returns the sha256 a manifest pushed by digest d is stored under,
// or "" if none.
func (r *Registry) alias(ctx context.Context, repo string, d digest.Digest) (digest.Digest, error) {
	link, err := r.readLink(ctx, aliasPath(repo, d))
	if err != nil || link == "" {
		return "", err
	}
	return digest.Parse(link)
}

// readLink reads a link file: the digest it holds as written (the
// caller parses it), "" when there is none.
func (r *Registry) readLink(ctx context.Context, p string) (string, error) {
	raw, err := r.driver.GetContent(ctx, p)
	if isMissing(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(raw)), nil
}

// writeLink points link file p at d, as distribution's links do.
func (r *Registry) writeLink(ctx context.Context, p string, d digest.Digest) error {
	return r.driver.PutContent(ctx, p, []byte(d.String()))
}

// isMissing reports a storage driver's "no such path".
func isMissing(err error) bool {
	var missing storagedriver.PathNotFoundError
	return errors.As(err, &missing)
}

// ociManifest is the part of a manifest or index the referrers index needs.
type ociManifest struct {
	MediaType    string            `json:"mediaType"`
	ArtifactType string            `json:"artifactType"`
	Config       *v1.Descriptor    `json:"config"`
	Subject      *v1.Descriptor    `json:"subject"`
	Annotations  map[string]string `json:"annotations"`
	Manifests    json.RawMessage   `json:"manifests"`
}

// referrerEntry is the index entry of manifest self, a referrer of subject, in repo.
func referrerEntry(repo string, subject, self digest.Digest) string {
	return referrersDir(repo, subject) + "/" + self.Algorithm().String() + "/" + self.Encoded()
}

// indexReferrer records manifest self of repo (body exactly as stored;
// mediaType its type when body does not say) under its subject, if it
// has one, and returns that subject. Every way a manifest gets into a
// repository calls it: a push over the API, Tag, PutManifest and the
// backfill of manifests stored before the index existed.
func (r *Registry) indexReferrer(ctx context.Context, repo string, self digest.Digest, mediaType string, body []byte) (digest.Digest, error) {
	var m ociManifest
	// Not JSON, or no subject: nothing to index (distribution judges
	// whether the manifest is valid).
	if json.Unmarshal(body, &m) != nil || m.Subject == nil || m.Subject.Digest.Validate() != nil {
		return "", nil
	}
	mt := m.MediaType
	if mt == "" {
		mt = mediaType
	}
	if mt == "" {
		// A manifest whose push named no type either: its shape says.
		mt = v1.MediaTypeImageManifest
		if len(m.Manifests) > 0 {
			mt = v1.MediaTypeImageIndex
		}
	}
	desc := v1.Descriptor{MediaType: mt, Digest: self, Size: int64(len(body)), ArtifactType: m.ArtifactType, Annotations: m.Annotations}
	if desc.ArtifactType == "" && m.Config != nil {
		desc.ArtifactType = m.Config.MediaType
	}
	entry, err := json.Marshal(desc)
	if err != nil {
		return "", err
	}
	if err := r.driver.PutContent(ctx, referrerEntry(repo, m.Subject.Digest, self), entry); err != nil {
		return "", fmt.Errorf("index %s in %s as a referrer of %s: %w", self, repo, m.Subject.Digest, err)
	}
	return m.Subject.Digest, nil
}

// backfillMarker is the file whose presence says that repo's manifests
// stored before kiln kept a referrers index (a data dir of an older kiln)
// have been indexed.
func backfillMarker(repo string) string { return repoDir(repo) + "/_referrers/backfilled" }

// backfillReferrers indexes, once per repository, every manifest of repo
// with a subject; the first referrers query of a repository runs it.
// After that every way a manifest enters repo indexes it. Running it
// twice, or beside a push, only writes the same entries again; an entry
// of a manifest deleted meanwhile is dropped by Referrers as any other.
func (r *Registry) backfillReferrers(ctx context.Context, repo string) error {
	if done, err := r.exists(ctx, backfillMarker(repo)); err != nil || done {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("index the referrers of %s stored before kiln kept a referrers index: %w", repo, err)
	}
	// A revision link's path names the digest a manifest was pushed by,
	// its content the sha256 it is stored under: a manifest pushed by
	// sha512 has both, and is indexed by the name it was pushed by, as a
	// push indexes it.
	revisions := repoDir(repo) + "/_manifests/revisions"
	names := map[digest.Digest][]digest.Digest{}
	err := r.driver.Walk(ctx, revisions, func(fi storagedriver.FileInfo) error {
		if fi.IsDir() || path.Base(fi.Path()) != "link" {
			return nil
		}
		alg, hex, _ := strings.Cut(strings.TrimPrefix(path.Dir(fi.Path()), revisions+"/"), "/")
		name := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
		link, err := r.readLink(ctx, fi.Path())
		if err != nil {
			return err
		}
		if link == "" {
			return nil // deleted while walking
		}
		stored, err := digest.Parse(link)
		if err != nil || name.Validate() != nil {
			return nil // not a revision distribution wrote
		}
		if name != stored {
			names[stored] = append(names[stored], name)
		} else if _, ok := names[stored]; !ok {
			names[stored] = nil
		}
		return nil
	})
	if isMissing(err) {
		return nil // no manifest yet: pushes from now on index themselves
	}
	if err != nil {
		return fail(err)
	}
	for stored, aliases := range names {
		body, err := r.manifestBytes(ctx, stored)
		if errors.Is(err, ErrNotFound) || errors.Is(err, errManifestTooLarge) {
			// Its blob is gone (deleted, collected), or it is no manifest
			// a client could have pushed: nothing to serve.
			continue
		}
		if err != nil {
			return fail(err)
		}
		if len(aliases) == 0 {
			aliases = []digest.Digest{stored}
		}
		for _, self := range aliases {
			if _, err := r.indexReferrer(ctx, repo, self, "", body); err != nil {
				return fail(err)
			}
		}
	}
	if err := r.driver.PutContent(ctx, backfillMarker(repo), []byte("1")); err != nil {
		return fail(err)
	}
	return nil
}

// errManifestTooLarge: a stored manifest larger than MaxManifestSize.
var errManifestTooLarge = errors.New("manifest larger than 4 MiB")

// manifestBytes reads manifest d from the content store, refusing one
// larger than a manifest may be.
func (r *Registry) manifestBytes(ctx context.Context, d digest.Digest) ([]byte, error) {
	rc, err := r.Blob(ctx, d.String())
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	body, err := io.ReadAll(io.LimitReader(rc, MaxManifestSize+1))
	if err != nil {
		return nil, fmt.Errorf("read manifest %s: %w", d, err)
	}
	if len(body) > MaxManifestSize {
		return nil, fmt.Errorf("manifest %s: %w", d, errManifestTooLarge)
	}
	return body, nil
}

// manifest11 handles manifest requests: sha512 references through their
// alias, and on a push the subject (indexed, and answered with
// OCI-Subject).
func (r *Registry) manifest11(w http.ResponseWriter, req *http.Request, repo, ref string) (http.ResponseWriter, *http.Request, bool) {
	d, derr := digest.Parse(ref)
	byOther := derr == nil && d.Algorithm() != digest.SHA256
	switch req.Method {
	case http.MethodGet, http.MethodHead:
		return w, req, false // distribution follows the alias
	case http.MethodDelete:
		if !byOther {
			return w, req, false
		}
		canon, err := r.alias(req.Context(), repo, d)
		if err != nil || canon == "" {
			return w, req, false // distribution answers: unknown
		}
		req = withPath(req, "/v2/"+repo+"/manifests/"+canon.String())
		rw := &digestRewriter{ResponseWriter: w, want: d}
		rw.after = func() { _ = r.driver.Delete(context.WithoutCancel(req.Context()), aliasPath(repo, d)) }
		return rw, req, false
	case http.MethodPut:
	default:
		return w, req, false
	}
	body, err := io.ReadAll(io.LimitReader(req.Body, MaxManifestSize+1))
	if err != nil {
		writeError(w, http.StatusBadRequest, "MANIFEST_INVALID", "read manifest: "+err.Error())
		return w, req, true
	}
	if len(body) > MaxManifestSize {
		writeError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", errManifestTooLarge.Error())
		return w, req, true
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	canon := digest.FromBytes(body)
	self := canon
	if byOther {
		if !d.Algorithm().Available() || d.Algorithm().FromBytes(body) != d {
			writeError(w, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("manifest digest %s does not match its content", d))
			return w, req, true
		}
		self = d
		req = withPath(req, "/v2/"+repo+"/manifests/"+canon.String())
	}
	rw := &digestRewriter{ResponseWriter: w}
	if byOther {
		rw.want = d
	}
	rw.before = func() error {
		ctx := context.WithoutCancel(req.Context())
		if byOther {
			if err := r.writeLink(ctx, aliasPath(repo, d), canon); err != nil {
				return err
			}
		}
		subject, err := r.indexReferrer(ctx, repo, self, req.Header.Get("Content-Type"), body)
		if err != nil {
			return err
		}
		if subject != "" {
			rw.Header().Set("OCI-Subject", subject.String())
		}
		return nil
	}
	return rw, req, false
}

func withPath(req *http.Request, p string) *http.Request {
	req = req.Clone(req.Context())
	u := *req.URL
	u.Path, u.RawPath = p, ""
	req.URL = &u
	req.RequestURI = u.RequestURI()
	return req
}

// digestRewriter adjusts a successful answer of distribution's: its
// Docker-Content-Digest and Location name want (the digest the client
// asked by) instead of the sha256 distribution stores under; before runs
// first (a failure turns the answer into a 500), after once it is sent.
type digestRewriter struct {
	http.ResponseWriter
	want        digest.Digest
	before      func() error
	after       func()
	wroteHeader bool
	failed      bool
	// canon is the digest distribution answered with, when rewritten.
	canon string
}

func (d *digestRewriter) WriteHeader(code int) {
	if d.wroteHeader {
		return
	}
	d.wroteHeader = true
	if code >= 200 && code < 300 {
		h := d.Header()
		if d.want != "" {
			if old := h.Get("Docker-Content-Digest"); old != "" && old != d.want.String() {
				d.canon = old
				h.Set("Docker-Content-Digest", d.want.String())
				if loc := h.Get("Location"); loc != "" {
					h.Set("Location", strings.Replace(loc, old, d.want.String(), 1))
				}
			}
		}
		if d.before != nil {
			if err := d.before(); err != nil {
				d.failed = true
				h.Del("Location")
				h.Del("Docker-Content-Digest")
				writeError(d.ResponseWriter, http.StatusInternalServerError, "UNKNOWN", "index the manifest: "+err.Error())
				return
			}
		}
		if d.after != nil {
			defer d.after()
		}
	}
	d.ResponseWriter.WriteHeader(code)
}

func (d *digestRewriter) Write(b []byte) (int, error) {
	if !d.wroteHeader {
		d.WriteHeader(http.StatusOK)
	}
	if d.failed {
		return len(b), nil
	}
	return d.ResponseWriter.Write(b)
}

// Flush lets streamed blob answers through.
func (d *digestRewriter) Flush() {
	if f, ok := d.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
