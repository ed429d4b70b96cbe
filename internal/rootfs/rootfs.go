package rootfs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Source reads content-addressed blobs (manifests, configs, layers) by
// digest. *registry.Registry satisfies it.
type Source interface {
	Blob(ctx context.Context, digest string) (io.ReadCloser, error)
}

// Format is the filesystem type of a converted root filesystem.
type Format string

// The formats Convert can build.
const (
	// FormatErofs is a read-only erofs image built by mkfs.erofs.
	FormatErofs Format = "erofs"
	// FormatExt4 is an ext4 image (no journal) built by mkfs.ext4 -d.
	FormatExt4 Format = "ext4"
)

// DefaultPlatform is the platform picked from multi-platform images.
const DefaultPlatform = "linux/amd64"

// Options tune a conversion. The zero value builds an uncompressed erofs
// image of linux/amd64.
type Options struct {
	// Format is the filesystem to build; default FormatErofs.
	Format Format
	// Compression is an erofs compressor mkfs.erofs knows ("lz4",
	// "lz4hc", optionally with ",level"); empty stores data uncompressed,
	// which boots fastest. Ignored for ext4.
	Compression string
	// Platform is the os/architecture picked from an image index; default
	// DefaultPlatform.
	Platform string
	// Progress, when set, is called from the converting goroutine as layers
	// are applied and when the filesystem is built. It must not block.
	Progress func(Progress)
}

// Phase names the step a conversion is in.
type Phase string

// Conversion phases, in order.
const (
	PhaseLayers Phase = "layers"
	PhaseMkfs   Phase = "mkfs"
	PhaseDone   Phase = "done"
)

// Progress reports how far a conversion is.
type Progress struct {
	Digest string
	Phase  Phase
	// Layer is the 1-based index of the layer being applied, of Layers.
	Layer, Layers int
	// Applied counts the (compressed) layer bytes read so far, of Total.
	Applied, Total int64
}

// ImageConfig is what a VM needs from the image config to run it.
type ImageConfig struct {
	Entrypoint []string          `json:"entrypoint,omitempty"`
	Cmd        []string          `json:"cmd,omitempty"`
	Env        []string          `json:"env,omitempty"`
	WorkingDir string            `json:"workingDir,omitempty"`
	User       string            `json:"user,omitempty"`
	StopSignal string            `json:"stopSignal,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
}

// Artifact is a converted root filesystem. Its JSON form is the
// config.json stored next to the filesystem image.
type Artifact struct {
	// Digest is the digest that was asked for: an image manifest, or an
	// index from which ManifestDigest was picked.
	Digest         string `json:"digest"`
	ManifestDigest string `json:"manifestDigest"`
	Platform       string `json:"platform"`
	Format         Format `json:"format"`
	// Size is the size in bytes of the filesystem image file.
	Size int64 `json:"size"`
	// Layers and LayerBytes describe the applied layers (compressed size).
	Layers     int         `json:"layers"`
	LayerBytes int64       `json:"layerBytes"`
	Config     ImageConfig `json:"config"`
	// Dir is the directory holding the filesystem image and config.json.
	Dir string `json:"-"`
}

// RootFS is the path of the filesystem image.
func (a Artifact) RootFS() string { return filepath.Join(a.Dir, rootfsName(a.Format)) }

// ConfigPath is the path of config.json.
func (a Artifact) ConfigPath() string { return filepath.Join(a.Dir, configName) }

// Result is a finished conversion.
type Result struct {
	Artifact
	// Duration is the wall time of the whole conversion, Mkfs that of
	// building the filesystem image alone.
	Duration, Mkfs time.Duration
}

const configName = "config.json"

func rootfsName(f Format) string { return "rootfs." + string(f) }

func (o Options) withDefaults() (Options, error) {
	if o.Format == "" {
		o.Format = FormatErofs
	}
	if o.Format != FormatErofs && o.Format != FormatExt4 {
		return o, fmt.Errorf("unknown rootfs format %q: use %q or %q", o.Format, FormatErofs, FormatExt4)
	}
	if o.Platform == "" {
		o.Platform = DefaultPlatform
	}
	if goos, arch, ok := strings.Cut(o.Platform, "/"); !ok || goos == "" || arch == "" {
		return o, fmt.Errorf("platform %q is invalid: use os/architecture, e.g. %s", o.Platform, DefaultPlatform)
	}
	if strings.ContainsAny(o.Compression, " \t\n") {
		return o, fmt.Errorf("erofs compression %q is invalid: use a compressor name like lz4hc, optionally with ,level", o.Compression)
	}
	return o, nil
}

// ErrUnconvertible marks a conversion failure the image itself causes: a
// manifest, config or layer that is malformed, unsupported, for another
// platform or over a size limit. Converting the same digest again fails the
// same way, so Store remembers such failures across restarts. Other
// failures (cancellation, missing tools, I/O errors, a blob the registry
// cannot serve or a damaged stored copy) may pass and are retried. Test
// with errors.Is.
var ErrUnconvertible = errors.New("the image cannot be converted")

// unconvertibleError tags an error as ErrUnconvertible without changing
// its message.
type unconvertibleError struct{ err error }

func (e *unconvertibleError) Error() string        { return e.err.Error() }
func (e *unconvertibleError) Unwrap() error        { return e.err }
func (e *unconvertibleError) Is(target error) bool { return target == ErrUnconvertible }

// unconvertible tags err as caused by the image itself.
func unconvertible(err error) error {
	if err == nil || errors.Is(err, ErrUnconvertible) {
		return err
	}
	return &unconvertibleError{err}
}

// unconvertiblef is fmt.Errorf for failures the image itself causes.
func unconvertiblef(format string, args ...any) error {
	return unconvertible(fmt.Errorf(format, args...))
}

// Convert builds the root filesystem of image dgst (an image manifest, or an
// index from which opt.Platform is picked) and publishes it as the new
// directory dst holding rootfs.<format> and config.json. dst must not exist;
// its parent must. Work happens in a temporary sibling of dst, which is
// removed on any failure or cancellation, so dst either appears complete
// or not at all. A failure the image itself causes is ErrUnconvertible.
func Convert(ctx context.Context, src Source, dgst string, dst string, opt Options) (Result, error) {
	start := time.Now()
	opt, err := opt.withDefaults()
	if err != nil {
		return Result{}, err
	}
	if _, err := digest.Parse(dgst); err != nil {
		return Result{}, unconvertiblef("convert image %q: not a valid digest (want sha256:<64 hex>): %w", dgst, err)
	}
	fail := func(err error) (Result, error) {
		return Result{}, fmt.Errorf("convert image %s to %s: %w", dgst, opt.Format, err)
	}
	if _, err := os.Lstat(dst); err == nil {
		return fail(fmt.Errorf("destination %s already exists; remove it first", dst))
	} else if !errors.Is(err, os.ErrNotExist) {
		return fail(err)
	}
	if err := CheckTools(opt.Format); err != nil {
		return fail(err)
	}

	img, err := resolveImage(ctx, src, dgst, opt.Platform)
	if err != nil {
		return fail(err)
	}

	// The temporary directory sits next to dst so publishing is one rename
	// on one filesystem; Store.Open sweeps such leftovers after a crash.
	tmp, err := os.MkdirTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-")
	if err != nil {
		return fail(fmt.Errorf("create work directory: %w", err))
	}
	defer os.RemoveAll(tmp)
	staging := filepath.Join(tmp, "root")
	if err := os.Mkdir(staging, 0o755); err != nil {
		return fail(fmt.Errorf("create staging directory: %w", err))
	}
	if err := os.Chmod(staging, 0o755); err != nil { // whatever the umask
		return fail(fmt.Errorf("create staging directory: %w", err))
	}

	report := func(p Progress) {
		if opt.Progress != nil {
			p.Digest = dgst
			opt.Progress(p)
		}
	}
	if err := applyLayers(ctx, src, img, staging, report); err != nil {
		return fail(err)
	}

	out := filepath.Join(tmp, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return fail(fmt.Errorf("create output directory: %w", err))
	}
	report(Progress{Phase: PhaseMkfs, Layers: len(img.layers), Layer: len(img.layers), Applied: img.layerBytes, Total: img.layerBytes})
	mkfsStart := time.Now()
	image := filepath.Join(out, rootfsName(opt.Format))
	if err := buildFS(ctx, opt, dgst, staging, image); err != nil {
		return fail(err)
	}
	mkfsTime := time.Since(mkfsStart)
	// The tree is no longer needed; drop it before publishing so only the
	// image and its config ever become visible.
	if err := os.RemoveAll(staging); err != nil {
		return fail(fmt.Errorf("remove staging directory: %w", err))
	}

	fi, err := os.Stat(image)
	if err != nil {
		return fail(err)
	}
	art := Artifact{
		Digest:         dgst,
		ManifestDigest: img.manifestDigest,
		Platform:       img.platform,
		Format:         opt.Format,
		Size:           fi.Size(),
		Layers:         len(img.layers),
		LayerBytes:     img.layerBytes,
		Config:         img.config,
	}
	if err := writeConfig(filepath.Join(out, configName), art); err != nil {
		return fail(err)
	}
	if err := syncPath(image); err != nil {
		return fail(err)
	}
	if err := syncPath(out); err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if err := os.Rename(out, dst); err != nil {
		return fail(fmt.Errorf("publish %s: %w", dst, err))
	}
	if err := syncPath(filepath.Dir(dst)); err != nil {
		return fail(err)
	}
	art.Dir = dst
	report(Progress{Phase: PhaseDone, Layers: len(img.layers), Layer: len(img.layers), Applied: img.layerBytes, Total: img.layerBytes})
	return Result{Artifact: art, Duration: time.Since(start), Mkfs: mkfsTime}, nil
}

func writeConfig(path string, art Artifact) error {
	b, err := json.MarshalIndent(art, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", configName, err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", configName, err)
	}
	return syncPath(path)
}

// readArtifact loads the config.json of a published artifact directory.
func readArtifact(dir string) (Artifact, error) {
	b, err := os.ReadFile(filepath.Join(dir, configName))
	if err != nil {
		return Artifact{}, err
	}
	var art Artifact
	if err := json.Unmarshal(b, &art); err != nil {
		return Artifact{}, fmt.Errorf("read %s: %w", filepath.Join(dir, configName), err)
	}
	art.Dir = dir
	return art, nil
}

func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}
