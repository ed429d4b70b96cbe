package cachevol

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kiln-build/kiln/internal/ext4"
)

// scannedVolume is a committed scope volume as found on disk.
type scannedVolume struct {
	Info
	id string
}

// scan reads every committed scope volume, most recently used first.
// Directories without meta.json are being created or were left by a crash;
// they are not volumes yet.
func (m *Manager) scan() ([]scannedVolume, error) {
	entries, err := os.ReadDir(filepath.Join(m.dir, volumesDir))
	if err != nil {
		return nil, fmt.Errorf("list cache volumes: %w", err)
	}
	var out []scannedVolume
	for _, e := range entries {
		if !e.IsDir() || !isID(e.Name()) {
			continue
		}
		id, dir := e.Name(), m.volDir(e.Name())
		md, err := readMeta(dir)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				m.log.Warn("skipping cache volume with unreadable metadata", "dir", dir, "err", err)
			}
			continue
		}
		info := Info{
			Scope:     md.Scope,
			SizeBytes: md.SizeBytes,
			UsedBytes: md.LastUsedBytes,
			Created:   md.Created,
			LastUsed:  md.LastUsed,
			Stamp:     md.Stamp,
			InUse:     m.slotHeld(id) || lockedElsewhere(dir),
		}
		img := filepath.Join(dir, imageName)
		if fi, err := os.Stat(img); err == nil {
			info.SizeBytes = fi.Size()
			info.AllocatedBytes = allocatedBytes(fi)
		}
		if sb, err := ext4.ReadSuperblock(img); err == nil {
			info.UsedBytes = sb.UsedBytes()
		}
		out = append(out, scannedVolume{Info: info, id: id})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.After(out[j].LastUsed) })
	return out, nil
}

// scratchAllocated sums host bytes of live scratch volumes.
func (m *Manager) scratchAllocated() int64 {
	var total int64
	imgs, _ := filepath.Glob(filepath.Join(m.dir, scratchDir, "*", imageName))
	for _, p := range imgs {
		if fi, err := os.Stat(p); err == nil {
			total += allocatedBytes(fi)
		}
	}
	return total
}

// Evict deletes least-recently-used idle volumes until Config's limits
// hold, and returns what it deleted. Attached volumes are never evicted.
func (m *Manager) Evict(ctx context.Context) ([]Info, error) {
	if m.cfg.MaxTotalBytes == 0 && m.cfg.MaxCount == 0 {
		return nil, nil
	}
	m.evictMu.Lock()
	defer m.evictMu.Unlock()
	return m.evict(ctx, "")
}

// evictAfter runs eviction where its failure must not fail the caller. An
// eviction already under way covers it: that is also how a volume released
// by eviction itself (an idle warm builder stopped to make room) does not
// wait for the eviction that released it.
func (m *Manager) evictAfter(ctx context.Context, keepID string) {
	if m.cfg.MaxTotalBytes == 0 && m.cfg.MaxCount == 0 || !m.evictMu.TryLock() {
		return
	}
	defer m.evictMu.Unlock()
	if _, err := m.evict(ctx, keepID); err != nil {
		m.log.Error("cache volume eviction failed", "err", err)
	}
}

// evict runs with evictMu held.
func (m *Manager) evict(ctx context.Context, keepID string) ([]Info, error) {
	vols, err := m.scan()
	if err != nil {
		return nil, fmt.Errorf("evict cache volumes: %w", err)
	}
	total, count := m.scratchAllocated(), len(vols)
	for _, v := range vols {
		total += v.AllocatedBytes
	}
	var evicted []Info
	for i := len(vols) - 1; i >= 0; i-- { // least recently used first
		reason := m.overLimit(total, count)
		if reason == "" {
			break
		}
		if err := ctx.Err(); err != nil {
			return evicted, fmt.Errorf("evict cache volumes: %w", err)
		}
		v := vols[i]
		if v.id == keepID || v.InUse && !m.releaseIdle(v.Scope) {
			continue
		}
		lk, err := m.lockScope(ctx, v.id, false, false)
		if err != nil {
			continue // attached meanwhile, or deleted by someone else
		}
		err = m.removeVolume(v.id)
		lk.unlock()
		if err != nil {
			return evicted, fmt.Errorf("evict cache volume for scope %q: %w", shortScope(v.Scope), err)
		}
		m.log.Info("evicted cache volume", "scope", v.Scope, "reason", reason,
			"last_used", v.LastUsed, "allocated_bytes", v.AllocatedBytes, "used_bytes", v.UsedBytes)
		total -= v.AllocatedBytes
		count--
		evicted = append(evicted, v.Info)
	}
	if reason := m.overLimit(total, count); reason != "" {
		m.log.Warn("cache volume limits still exceeded: every remaining volume is in use or was just used", "reason", reason)
	}
	return evicted, nil
}

func (m *Manager) overLimit(total int64, count int) string {
	var why []string
	if m.cfg.MaxCount > 0 && count > m.cfg.MaxCount {
		why = append(why, fmt.Sprintf("%d volumes exceed the limit of %d", count, m.cfg.MaxCount))
	}
	if m.cfg.MaxTotalBytes > 0 && total > m.cfg.MaxTotalBytes {
		why = append(why, fmt.Sprintf("%d allocated bytes exceed the limit of %d", total, m.cfg.MaxTotalBytes))
	}
	return strings.Join(why, "; ")
}

// cleanup removes what no live process holds: every scratch volume, the
// temp files of interrupted writes, and volumes whose create (or delete)
// never committed.
func (m *Manager) cleanup() error {
	ctx := context.Background()
	scratch, err := os.ReadDir(filepath.Join(m.dir, scratchDir))
	if err != nil {
		return err
	}
	for _, e := range scratch {
		p := filepath.Join(m.dir, scratchDir, e.Name())
		if !e.IsDir() {
			if err := os.Remove(p); err != nil {
				return err
			}
			continue
		}
		f, err := lockDir(ctx, p, false, false)
		if errors.Is(err, errBusy) {
			continue // another live kiln process is using it
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		rmErr := os.RemoveAll(p)
		if f != nil {
			f.Close()
		}
		if rmErr != nil {
			return rmErr
		}
		m.log.Info("removed leftover scratch volume", "dir", p)
	}

	vols, err := os.ReadDir(filepath.Join(m.dir, volumesDir))
	if err != nil {
		return err
	}
	for _, e := range vols {
		if !e.IsDir() || !isID(e.Name()) {
			m.log.Warn("ignoring unexpected entry in cache volume dir", "name", e.Name())
			continue
		}
		id := e.Name()
		lk, err := m.lockScope(ctx, id, false, false)
		if errors.Is(err, errBusy) || errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		err = m.cleanVolumeDir(id)
		lk.unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) cleanVolumeDir(id string) error {
	dir := m.volDir(id)
	for _, name := range []string{imageName + tmpSuffix, metaName + tmpSuffix} {
		if err := removeIfExists(filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	_, metaErr := readMeta(dir)
	_, imgErr := os.Stat(filepath.Join(dir, imageName))
	if metaErr == nil && imgErr == nil {
		return nil
	}
	if err := m.removeVolume(id); err != nil {
		return err
	}
	m.log.Info("removed half-created cache volume", "dir", dir)
	return nil
}

func isID(name string) bool {
	if len(name) != 32 {
		return false
	}
	for _, c := range name {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
