package cachevol

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/ext4"
)

var (
	// ErrInUse means a build holds the volume (an errdefs.ErrInUse).
	ErrInUse = errdefs.Sentinel(errdefs.ErrInUse, "cache volume is in use")
	// ErrNotFound means the scope has no cache volume (an
	// errdefs.ErrNotFound).
	ErrNotFound = errdefs.Sentinel(errdefs.ErrNotFound, "cache volume not found")
	// ErrInvalidScope means the scope string cannot name a cache volume
	// (an errdefs.ErrInvalid).
	ErrInvalidScope = errdefs.Sentinel(errdefs.ErrInvalid, "invalid cache scope")
)

const (
	// DefaultSize is the filesystem size of a new volume when Config leaves
	// it zero. The file is sparse: the host pays only for what BuildKit writes.
	DefaultSize int64 = 20 << 30
	// MinSize is the smallest volume kiln makes; below it BuildKit cannot
	// hold even its own state next to a layer.
	MinSize int64 = 32 << 20
	// MaxScopeLen bounds scope strings (bytes) so a bogus claim cannot bloat
	// metadata and logs.
	MaxScopeLen = 1024
)

// Config sets the limits of a Manager.
type Config struct {
	// DefaultSize is the filesystem size of new volumes; 0 means DefaultSize.
	DefaultSize int64
	// MaxTotalBytes bounds host bytes allocated by all volumes, scratch
	// included; 0 means unlimited. Attached volumes are never evicted, so
	// running builds can exceed it until they release.
	MaxTotalBytes int64
	// MaxCount bounds the number of scope volumes (scratch not counted);
	// 0 means unlimited.
	MaxCount int
	// Stamp names the BuildKit version. A volume made under another stamp
	// is recreated empty on its next acquire, because BuildKit's on-disk
	// state is not promised to survive version changes.
	Stamp string
	// Logger receives creation, wipe and eviction records; nil means slog.Default().
	Logger *slog.Logger
}

// Info describes one scope volume.
type Info struct {
	Scope string
	// SizeBytes is the filesystem size (the sparse file's length).
	SizeBytes int64
	// UsedBytes is what ext4 reports in use, as of the volume's last unmount
	// or sync (metadata such as the journal included).
	UsedBytes int64
	// AllocatedBytes is what the image costs on the host disk.
	AllocatedBytes int64
	Created        time.Time
	LastUsed       time.Time
	InUse          bool
	Stamp          string
}

// Volume is one attached volume. The holder must call Release exactly when
// the build is over and the runtime has detached the image.
type Volume struct {
	m          *Manager
	scope      string
	id         string
	dir        string
	path       string
	size       int64
	created    bool
	wipeReason string
	scratch    bool
	lock       *scopeLock

	once       sync.Once
	releaseErr error
}

// Manager owns the volumes under one data directory.
type Manager struct {
	dir  string
	cfg  Config
	log  *slog.Logger
	mkfs string

	mu      sync.Mutex
	slots   map[string]*slot
	evictMu sync.Mutex
	holder  IdleHolder
}

// IdleHolder is whoever keeps volumes attached between builds (the warm
// builder pool). Eviction and Delete ask it to let go of an idle scope's
// volume before treating the volume as in use.
type IdleHolder interface {
	// ReleaseIdle stops what holds scope's volume while no build runs on
	// it and releases the volume; it reports whether it did.
	ReleaseIdle(scope string) bool
}

// SetIdleHolder registers h; call it before the first Acquire.
func (m *Manager) SetIdleHolder(h IdleHolder) { m.holder = h }

// releaseIdle asks the idle holder, if any, to let go of scope.
func (m *Manager) releaseIdle(scope string) bool {
	return m.holder != nil && m.holder.ReleaseIdle(scope)
}

// meta is the commit record of a scope volume: a volume directory without
// a readable meta.json is a leftover of an interrupted create.
type meta struct {
	Version       int       `json:"version"`
	Scope         string    `json:"scope"`
	Stamp         string    `json:"stamp"`
	SizeBytes     int64     `json:"size_bytes"`
	Created       time.Time `json:"created"`
	LastUsed      time.Time `json:"last_used"`
	LastUsedBytes int64     `json:"last_used_bytes"`
}

const (
	volumesDir = "volumes"
	scratchDir = "scratch"
	lockName   = "lock"
	metaName   = "meta.json"
	imageName  = "volume.ext4"
	tmpSuffix  = ".tmp"
)

// Open prepares dir (created if missing) and removes what a crash left
// behind: scratch volumes and half-created scope volumes that no live
// process holds.
func Open(dir string, cfg Config) (*Manager, error) {
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = DefaultSize
	}
	switch {
	case cfg.DefaultSize < MinSize:
		return nil, fmt.Errorf("cache volume default size %d bytes is below the minimum of %d (32 MiB)", cfg.DefaultSize, MinSize)
	case cfg.MaxTotalBytes < 0:
		return nil, fmt.Errorf("cache volume byte limit %d is negative; use 0 for unlimited", cfg.MaxTotalBytes)
	case cfg.MaxCount < 0:
		return nil, fmt.Errorf("cache volume count limit %d is negative; use 0 for unlimited", cfg.MaxCount)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	mkfs, err := findMkfs()
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("cache volume dir %q: %w", dir, err)
	}
	for _, d := range []string{volumesDir, scratchDir} {
		if err := os.MkdirAll(filepath.Join(abs, d), 0o700); err != nil {
			return nil, fmt.Errorf("create cache volume dir: %w", err)
		}
	}
	m := &Manager{
		dir:   abs,
		cfg:   cfg,
		log:   cfg.Logger.With("component", "cachevol"),
		mkfs:  mkfs,
		slots: map[string]*slot{},
	}
	if err := m.cleanup(); err != nil {
		return nil, fmt.Errorf("clean up cache volumes in %s: %w", abs, err)
	}
	return m, nil
}

// Acquire attaches the scope's volume for one build, waiting while another
// build holds it, and creates or wipes it as needed.
func (m *Manager) Acquire(ctx context.Context, scope string) (*Volume, error) {
	v, err := m.acquire(ctx, scope, true)
	if err != nil {
		return nil, fmt.Errorf("acquire cache volume for scope %q: %w", shortScope(scope), err)
	}
	return v, nil
}

// TryAcquire is Acquire without waiting: ok is false when a build holds
// the volume. ctx bounds only a creation.
func (m *Manager) TryAcquire(ctx context.Context, scope string) (v *Volume, ok bool, err error) {
	v, err = m.acquire(ctx, scope, false)
	if errors.Is(err, errBusy) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("acquire cache volume for scope %q: %w", shortScope(scope), err)
	}
	return v, true, nil
}

func (m *Manager) acquire(ctx context.Context, scope string, wait bool) (*Volume, error) {
	id, err := scopeID(scope)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	lk, err := m.lockScope(ctx, id, true, wait)
	if err != nil {
		return nil, err
	}
	dir := m.volDir(id)
	v := &Volume{m: m, scope: scope, id: id, dir: dir, path: filepath.Join(dir, imageName), lock: lk}
	if devs := loopDevicesFor(v.path); len(devs) > 0 {
		lk.unlock()
		return nil, fmt.Errorf("%w: image is still attached to %s from an earlier build; unmount it (umount, losetup -d) before building again", ErrInUse, strings.Join(devs, ", "))
	}
	if err := m.prepare(ctx, v); err != nil {
		lk.unlock()
		return nil, err
	}
	if v.created {
		m.evictAfter(ctx, "")
	}
	return v, nil
}

// prepare makes v's directory hold a committed, current volume.
func (m *Manager) prepare(ctx context.Context, v *Volume) error {
	md, err := readMeta(v.dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		v.created = true
	case err != nil:
		v.created, v.wipeReason = true, "volume metadata was unreadable"
	case md.Scope != v.scope:
		// 128 bits of SHA-256 will not collide by accident; refuse rather
		// than hand one scope another's cache if it somehow does.
		return fmt.Errorf("volume dir %s belongs to another scope; delete it to continue", v.dir)
	case md.Stamp != m.cfg.Stamp:
		v.created, v.wipeReason = true, fmt.Sprintf("BuildKit version changed (%s → %s)", orNone(md.Stamp), orNone(m.cfg.Stamp))
	default:
		fi, err := os.Stat(v.path)
		if err != nil {
			v.created, v.wipeReason = true, "volume image was missing"
			break
		}
		sb, err := ext4.ReadSuperblock(v.path)
		switch {
		case err != nil:
			v.created, v.wipeReason = true, "volume image was damaged: "+err.Error()
		case sb.HasErrors:
			v.created, v.wipeReason = true, "filesystem had recorded errors"
		default:
			v.size = fi.Size()
			return nil
		}
	}
	if v.wipeReason != "" {
		m.log.Warn("wiping cache volume", "scope", v.scope, "reason", v.wipeReason)
	}
	return m.create(ctx, v)
}

// create (re)makes the volume. The meta.json removal comes first and its
// rename comes last, so a crash anywhere between leaves a dir that Open
// recognizes as half-created.
func (m *Manager) create(ctx context.Context, v *Volume) error {
	if err := removeIfExists(filepath.Join(v.dir, metaName)); err != nil {
		return err
	}
	if err := syncDir(v.dir); err != nil {
		return err
	}
	tmp := v.path + tmpSuffix
	for _, p := range []string{tmp, filepath.Join(v.dir, metaName+tmpSuffix), v.path} {
		if err := removeIfExists(p); err != nil {
			return err
		}
	}
	size := m.cfg.DefaultSize
	if err := makeImage(ctx, m.mkfs, tmp, size); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create volume: %w", err)
	}
	if err := os.Rename(tmp, v.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create volume: %w", err)
	}
	now := time.Now().UTC()
	md := meta{Version: 1, Scope: v.scope, Stamp: m.cfg.Stamp, SizeBytes: size, Created: now, LastUsed: now}
	if sb, err := ext4.ReadSuperblock(v.path); err == nil {
		md.LastUsedBytes = sb.UsedBytes()
	}
	if err := writeMeta(v.dir, md); err != nil {
		return fmt.Errorf("create volume: %w", err)
	}
	v.size = size
	m.log.Info("created cache volume", "scope", v.scope, "size_bytes", size, "wiped", v.wipeReason != "", "reason", v.wipeReason)
	return nil
}

// Scratch makes a volume for one build without a cache scope; Release
// deletes it. sizeBytes 0 means Config.DefaultSize.
func (m *Manager) Scratch(ctx context.Context, sizeBytes int64) (*Volume, error) {
	if sizeBytes == 0 {
		sizeBytes = m.cfg.DefaultSize
	}
	if sizeBytes < MinSize {
		return nil, fmt.Errorf("create scratch volume: size %d bytes is below the minimum of %d (32 MiB)", sizeBytes, MinSize)
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("create scratch volume: %w", err)
	}
	dir := filepath.Join(m.dir, scratchDir, hex.EncodeToString(rnd[:]))
	f, err := lockDir(ctx, dir, true, false)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("create scratch volume: %w", err)
	}
	v := &Volume{m: m, dir: dir, path: filepath.Join(dir, imageName), size: sizeBytes,
		created: true, scratch: true, lock: &scopeLock{file: f, release: func() {}}}
	if err := makeImage(ctx, m.mkfs, v.path, sizeBytes); err != nil {
		os.RemoveAll(dir)
		f.Close()
		return nil, fmt.Errorf("create scratch volume: %w", err)
	}
	m.evictAfter(ctx, "")
	return v, nil
}

// Path is the ext4 image file the runtime attaches.
func (v *Volume) Path() string { return v.path }

// Scope is the volume's cache scope; "" for a scratch volume.
func (v *Volume) Scope() string { return v.scope }

// Size is the filesystem size in bytes.
func (v *Volume) Size() int64 { return v.size }

// Created reports that this acquire made the volume, so the build starts cold.
func (v *Volume) Created() bool { return v.created }

// Wiped reports that an existing volume was recreated empty; WipeReason says why.
func (v *Volume) Wiped() bool { return v.wipeReason != "" }

// WipeReason is a human sentence such as "BuildKit version changed (v0.33.0 → v0.34.2)".
func (v *Volume) WipeReason() string { return v.wipeReason }

// IsScratch reports a one-build volume that Release deletes.
func (v *Volume) IsScratch() bool { return v.scratch }

// Release ends the build's hold: a scope volume records its last use and
// unlocks (then idle volumes may be evicted), a scratch volume is deleted.
// Calling it again returns the first result.
func (v *Volume) Release() error {
	v.once.Do(func() { v.releaseErr = v.release() })
	return v.releaseErr
}

func (v *Volume) release() error {
	m := v.m
	var errs []error
	if devs := loopDevicesFor(v.path); len(devs) > 0 {
		// Unlock anyway: holding the lock forever would wedge the scope,
		// and Acquire refuses while the attachment lasts.
		errs = append(errs, fmt.Errorf("image %s is still attached to %s: the runtime must detach it before Release", v.path, strings.Join(devs, ", ")))
	}
	if v.scratch {
		if err := os.RemoveAll(v.dir); err != nil {
			errs = append(errs, fmt.Errorf("delete scratch volume: %w", err))
		}
		v.lock.unlock()
		return errors.Join(errs...)
	}
	md, err := readMeta(v.dir)
	if err == nil {
		md.LastUsed = time.Now().UTC()
		if sb, err := ext4.ReadSuperblock(v.path); err == nil {
			md.LastUsedBytes = sb.UsedBytes()
		} else {
			m.log.Warn("cannot read cache volume usage", "scope", v.scope, "err", err)
		}
		err = writeMeta(v.dir, md)
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("record last use: %w", err))
	}
	v.lock.unlock()
	// The build grew the volume, so limits may be exceeded now; the volume
	// just used is the warmest and is kept.
	m.evictAfter(context.Background(), v.id)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("release cache volume for scope %q: %w", shortScope(v.scope), err)
	}
	return nil
}

// List describes all scope volumes, most recently used first.
func (m *Manager) List() ([]Info, error) {
	vols, err := m.scan()
	if err != nil {
		return nil, err
	}
	out := make([]Info, len(vols))
	for i, sv := range vols {
		out[i] = sv.Info
	}
	return out, nil
}

// Delete removes the scope's volume. It refuses with ErrInUse while a
// build holds it.
func (m *Manager) Delete(ctx context.Context, scope string) error {
	id, err := scopeID(scope)
	if err != nil {
		return fmt.Errorf("delete cache volume: %w", err)
	}
	lk, err := m.lockScope(ctx, id, false, false)
	if errors.Is(err, errBusy) && m.releaseIdle(scope) {
		// A warm builder held it between builds; it is stopped now.
		lk, err = m.lockScope(ctx, id, false, false)
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("delete cache volume for scope %q: %w", shortScope(scope), ErrNotFound)
	case errors.Is(err, errBusy):
		return fmt.Errorf("delete cache volume for scope %q: %w: a build is using it; wait for the build to finish or cancel it, then retry", shortScope(scope), ErrInUse)
	case err != nil:
		return fmt.Errorf("delete cache volume for scope %q: %w", shortScope(scope), err)
	}
	defer lk.unlock()
	if _, err := readMeta(m.volDir(id)); errors.Is(err, os.ErrNotExist) {
		os.RemoveAll(m.volDir(id)) // nothing committed; drop the lock dir we may have touched
		return fmt.Errorf("delete cache volume for scope %q: %w", shortScope(scope), ErrNotFound)
	}
	if devs := loopDevicesFor(filepath.Join(m.volDir(id), imageName)); len(devs) > 0 {
		return fmt.Errorf("delete cache volume for scope %q: %w: image is attached to %s; unmount it first", shortScope(scope), ErrInUse, strings.Join(devs, ", "))
	}
	if err := m.removeVolume(id); err != nil {
		return fmt.Errorf("delete cache volume for scope %q: %w", shortScope(scope), err)
	}
	m.log.Info("deleted cache volume", "scope", scope)
	return nil
}

// removeVolume deletes a locked volume dir, meta.json first so that an
// interrupted delete looks half-created rather than valid.
func (m *Manager) removeVolume(id string) error {
	dir := m.volDir(id)
	if err := removeIfExists(filepath.Join(dir, metaName)); err != nil {
		return err
	}
	_ = syncDir(dir)
	for _, name := range []string{imageName, imageName + tmpSuffix, metaName + tmpSuffix, lockName} {
		if err := removeIfExists(filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	// Fails harmlessly if a waiter already made a fresh lock file inside.
	_ = os.Remove(dir)
	return nil
}

func (m *Manager) volDir(id string) string { return filepath.Join(m.dir, volumesDir, id) }

// scopeID validates scope and returns the directory name that stands for it.
func scopeID(scope string) (string, error) {
	switch {
	case scope == "":
		return "", fmt.Errorf("%w: scope is empty; a build without a cache scope needs a scratch volume", ErrInvalidScope)
	case len(scope) > MaxScopeLen:
		return "", fmt.Errorf("%w: scope is %d bytes long; at most %d are allowed", ErrInvalidScope, len(scope), MaxScopeLen)
	case !utf8.ValidString(scope):
		return "", fmt.Errorf("%w: scope %q is not valid UTF-8", ErrInvalidScope, shortScope(scope))
	case strings.IndexFunc(scope, unicode.IsControl) >= 0:
		return "", fmt.Errorf("%w: scope %q contains control characters", ErrInvalidScope, shortScope(scope))
	}
	sum := sha256.Sum256([]byte(scope))
	return hex.EncodeToString(sum[:16]), nil
}

// shortScope keeps error messages readable when a claim is huge.
func shortScope(s string) string {
	if len(s) <= 80 {
		return s
	}
	return s[:80] + "…"
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func readMeta(dir string) (meta, error) {
	b, err := os.ReadFile(filepath.Join(dir, metaName))
	if err != nil {
		return meta{}, err
	}
	var md meta
	if err := json.Unmarshal(b, &md); err != nil {
		return meta{}, fmt.Errorf("parse %s: %w", filepath.Join(dir, metaName), err)
	}
	if md.Scope == "" {
		return meta{}, fmt.Errorf("parse %s: no scope", filepath.Join(dir, metaName))
	}
	return md, nil
}

func writeMeta(dir string, md meta) error {
	b, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, metaName+tmpSuffix)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write volume metadata: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, metaName))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write volume metadata: %w", err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
