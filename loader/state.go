package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
)

// BackendIDLen is the longest backend id the maps keep; longer ids are cut.
const BackendIDLen = 48

// MaxAffinity is how many client bindings the affinity map holds; beyond
// it the least recently used are evicted.
const MaxAffinity = 1 << 20

// reusableAffinity opens the affinity map a previous process pinned, so
// bindings survive a restart. A pinned map of another shape is an error
// naming both shapes and the fix, never silently replaced.
func reusableAffinity(spec *ebpf.CollectionSpec, pinPath string) (*ebpf.Map, error) {
	path := filepath.Join(pinPath, "affinity")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned affinity map %s: %w", path, err)
	}
	want := spec.Maps["affinity"]
	info, err := m.Info()
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("inspect pinned affinity map %s: %w", path, err)
	}
	if info.Type != want.Type || info.KeySize != want.KeySize || info.ValueSize != want.ValueSize || info.MaxEntries != want.MaxEntries {
		m.Close()
		return nil, fmt.Errorf("pinned affinity map %s is %s key %d value %d entries %d, this edgeproxy needs %s key %d value %d entries %d: remove it (rm %s) to start without the old bindings",
			path, info.Type, info.KeySize, info.ValueSize, info.MaxEntries, want.Type, want.KeySize, want.ValueSize, want.MaxEntries, path)
	}
	return m, nil
}

// BackendInfo is what the backends map shows of one backend.
type BackendInfo struct {
	ID                           string
	Addr                         netip.Addr
	Port                         uint16
	Healthy                      bool
	Weight, SoftLimit, HardLimit uint32
}

func (s *Sockmap) backendSlot(index uint32) *proxyBackendInfo {
	return (*proxyBackendInfo)(unsafe.Pointer(&s.backends[int(index)*int(unsafe.Sizeof(proxyBackendInfo{}))]))
}

// SetBackend writes a backend into its slot, keeping the live count.
func (s *Sockmap) SetBackend(index uint32, b BackendInfo) error {
	if index >= MaxBackends {
		return fmt.Errorf("backend %s: slot %d beyond the map's %d", b.ID, index, MaxBackends)
	}
	slot := s.backendSlot(index)
	var id [BackendIDLen]int8
	for i := 0; i < len(b.ID) && i < BackendIDLen-1; i++ {
		id[i] = int8(b.ID[i])
	}
	slot.Id = id
	slot.Addr = b.Addr.As16() // IPv4 comes out as ::ffff:a.b.c.d
	slot.Port = b.Port
	slot.Healthy = 0
	if b.Healthy {
		slot.Healthy = 1
	}
	slot.Weight, slot.SoftLimit, slot.HardLimit = b.Weight, b.SoftLimit, b.HardLimit
	return nil
}

// ClearBackend empties a slot whose backend left the routing table.
func (s *Sockmap) ClearBackend(index uint32) {
	if index < MaxBackends {
		active := atomic.LoadUint32(&s.backendSlot(index).Active)
		*s.backendSlot(index) = proxyBackendInfo{Active: active}
	}
}

// StoreActive records a backend's live connection count; a memory store,
// no system call, so it can run on every open and close.
func (s *Sockmap) StoreActive(index uint32, active uint32) {
	if index < MaxBackends {
		atomic.StoreUint32(&s.backendSlot(index).Active, active)
	}
}

// Affinity is the pinned client -> backend binding map.
type Affinity struct{ m *ebpf.Map }

// Affinity returns the binding map.
func (s *Sockmap) Affinity() *Affinity { return &Affinity{m: s.objs.Affinity} }

// clientKey is the address in 16 bytes; IPv4 and ::ffff:IPv4 coincide.
func clientKey(addr netip.Addr) proxyClientKey {
	return proxyClientKey{Addr: addr.As16()}
}

func idString(id [BackendIDLen]int8) string {
	b := make([]byte, 0, BackendIDLen)
	for _, c := range id {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// Lookup returns the client's binding. IPv4 and its mapped IPv6 form are
// the same client.
func (a *Affinity) Lookup(client netip.Addr) (backendID string, lastUsed time.Time, ok bool, err error) {
	var b proxyBinding
	if err := a.m.Lookup(clientKey(client), &b); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return "", time.Time{}, false, nil
		}
		return "", time.Time{}, false, fmt.Errorf("look up binding of %s: %w", client, err)
	}
	return idString(b.BackendId), time.Unix(0, int64(b.LastUsedUnixNs)), true, nil
}

// Bind records (or refreshes) the client's binding.
func (a *Affinity) Bind(client netip.Addr, backendID string, now time.Time) error {
	var b proxyBinding
	for i := 0; i < len(backendID) && i < BackendIDLen-1; i++ {
		b.BackendId[i] = int8(backendID[i])
	}
	b.LastUsedUnixNs = uint64(now.UnixNano())
	if err := a.m.Update(clientKey(client), &b, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bind %s to %s: %w", client, backendID, err)
	}
	return nil
}

// Forget drops the client's binding.
func (a *Affinity) Forget(client netip.Addr) error {
	if err := a.m.Delete(clientKey(client)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget binding of %s: %w", client, err)
	}
	return nil
}

// Sweep walks every binding and deletes those keep rejects; it returns how
// many remain and how many it removed.
func (a *Affinity) Sweep(keep func(backendID string, lastUsed time.Time) bool) (remaining, removed int, err error) {
	var cursor ebpf.MapBatchCursor
	keys := make([]proxyClientKey, 4096)
	values := make([]proxyBinding, 4096)
	var doomed []proxyClientKey
	for {
		n, err := a.m.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			if keep(idString(values[i].BackendId), time.Unix(0, int64(values[i].LastUsedUnixNs))) {
				remaining++
			} else {
				doomed = append(doomed, keys[i])
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return remaining, 0, fmt.Errorf("walk affinity bindings: %w", err)
		}
	}
	for len(doomed) > 0 {
		chunk := doomed[:min(len(doomed), 4096)]
		if _, err := a.m.BatchDelete(chunk, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return remaining, removed, fmt.Errorf("delete expired bindings: %w", err)
		}
		removed += len(chunk)
		doomed = doomed[len(chunk):]
	}
	return remaining, removed, nil
}
