package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
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
		// Field by field: the live count is another process's too, and a
		// whole-struct store could undo an add it makes meanwhile.
		slot := s.backendSlot(index)
		slot.Id, slot.Addr, slot.Port, slot.Healthy = [BackendIDLen]int8{}, [16]uint8{}, 0, 0
		slot.Weight, slot.SoftLimit, slot.HardLimit = 0, 0, 0
	}
}

// The live count of a slot is shared by every process using the backends
// map: during a hand-over the old and the new process both hold
// connections to a backend, and its hard limit counts them together. So the
// count is only ever changed by atomic adds on the mmapped word, never
// stored whole: a store would erase the other process's connections.

// ActiveOf is the backend's live connection count over every process
// sharing the map; a memory load, no system call.
func (s *Sockmap) ActiveOf(index uint32) uint32 {
	if index >= MaxBackends {
		return 0
	}
	return atomic.LoadUint32(&s.backendSlot(index).Active)
}

// ReserveActive takes one connection slot on the backend unless that would
// reach past hardLimit (0: no limit): a compare-and-swap on the shared
// word, so two processes deciding at once cannot both take the last slot.
func (s *Sockmap) ReserveActive(index uint32, hardLimit uint32) bool {
	if index >= MaxBackends {
		return true
	}
	word := &s.backendSlot(index).Active
	for {
		cur := atomic.LoadUint32(word)
		if hardLimit > 0 && cur >= hardLimit {
			return false
		}
		if atomic.CompareAndSwapUint32(word, cur, cur+1) {
			return true
		}
	}
}

// ReleaseActive gives one connection slot back; it never goes below zero.
func (s *Sockmap) ReleaseActive(index uint32) {
	if index >= MaxBackends {
		return
	}
	word := &s.backendSlot(index).Active
	for {
		cur := atomic.LoadUint32(word)
		if cur == 0 || atomic.CompareAndSwapUint32(word, cur, cur-1) {
			return
		}
	}
}

// BackendSlots lists the slots in use in the map: backends by id, and
// slots with no backend but live connections (a backend removed while a
// predecessor still held connections to it). A process taking over keeps
// the same slots, so both count into the same words.
func (s *Sockmap) BackendSlots() (byID map[string]uint32, busy []uint32) {
	byID = map[string]uint32{}
	for i := uint32(0); i < MaxBackends; i++ {
		slot := s.backendSlot(i)
		id := idString(slot.Id)
		switch {
		case id != "":
			byID[id] = i
		case atomic.LoadUint32(&slot.Active) > 0:
			busy = append(busy, i)
		}
	}
	return byID, busy
}

// Affinity is the pinned client -> backend binding map with a bounded
// copy of the bindings in use in userspace. A client seen recently is
// looked up in the copy, with no system call; another costs one map
// lookup, as before. Writes go to the map first and to the copy once the
// map took them, so the map always holds what the proxy routes by and
// bindings survive a restart. The copy is filled from the map when the
// data plane opens and brought in line with it on every sweep, so an entry
// an operator deleted with bpftool is forgotten by the next sweep at the
// latest. Only one process writes the map: the pin path is locked.
type Affinity struct {
	m *ebpf.Map

	mu     sync.Mutex
	cached map[proxyClientKey]cachedBinding
	// sweeping is when the running sweep began its walk, zero when none
	// runs: an entry written since then is kept even if the walk missed it.
	sweeping time.Time
}

type cachedBinding struct {
	backendID string
	lastUsed  time.Time
	written   time.Time // when this process wrote or loaded it
}

// Affinity returns the binding map.
func (s *Sockmap) Affinity() *Affinity { return s.affinity }

// affinityCopyEntries bounds the userspace copy: about 150 bytes each, so
// at most about 10 MiB, where the map's million entries would cost 150
// MiB of heap to mirror in full. A client beyond it costs one lookup.
const affinityCopyEntries = 1 << 16

// openAffinity wraps the map and copies the bindings it holds, up to
// affinityCopyEntries of them.
func openAffinity(m *ebpf.Map) (*Affinity, error) {
	a := &Affinity{m: m, cached: map[proxyClientKey]cachedBinding{}}
	if _, _, err := a.Sweep(func(string, time.Time) bool { return true }); err != nil {
		return nil, fmt.Errorf("load affinity bindings: %w", err)
	}
	return a, nil
}

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
// the same client. It reads the userspace copy: no system call.
func (a *Affinity) Lookup(client netip.Addr) (backendID string, lastUsed time.Time, ok bool, err error) {
	key := clientKey(client)
	a.mu.Lock()
	b, ok := a.cached[key]
	a.mu.Unlock()
	if ok {
		return b.backendID, b.lastUsed, true, nil
	}
	var stored proxyBinding
	if err := a.m.Lookup(key, &stored); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return "", time.Time{}, false, nil
		}
		return "", time.Time{}, false, fmt.Errorf("look up binding of %s: %w", client, err)
	}
	b = cachedBinding{backendID: idString(stored.BackendId), lastUsed: time.Unix(0, int64(stored.LastUsedUnixNs)), written: time.Now()}
	a.mu.Lock()
	if _, raced := a.cached[key]; !raced {
		a.remember(key, b)
	}
	a.mu.Unlock()
	return b.backendID, b.lastUsed, true, nil
}

// remember puts b in the copy, making room by dropping any one entry when
// the copy is full. Callers hold a.mu.
func (a *Affinity) remember(key proxyClientKey, b cachedBinding) {
	if _, known := a.cached[key]; !known && len(a.cached) >= affinityCopyEntries {
		for k := range a.cached {
			delete(a.cached, k)
			break
		}
	}
	a.cached[key] = b
}

// Bind records (or refreshes) the client's binding: one map write, then
// the copy.
func (a *Affinity) Bind(client netip.Addr, backendID string, now time.Time) error {
	var b proxyBinding
	for i := 0; i < len(backendID) && i < BackendIDLen-1; i++ {
		b.BackendId[i] = int8(backendID[i])
	}
	b.LastUsedUnixNs = uint64(now.UnixNano())
	key := clientKey(client)
	if err := a.m.Update(key, &b, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bind %s to %s: %w", client, backendID, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	// The stored id is cut like the map's, so the copy reads back what a
	// restarted process would.
	a.remember(key, cachedBinding{backendID: idString(b.BackendId), lastUsed: time.Unix(0, int64(b.LastUsedUnixNs)), written: time.Now()})
	return nil
}

// Forget drops the client's binding.
func (a *Affinity) Forget(client netip.Addr) error {
	key := clientKey(client)
	if err := a.m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget binding of %s: %w", client, err)
	}
	a.mu.Lock()
	delete(a.cached, key)
	a.mu.Unlock()
	return nil
}

// Sweep walks every binding and deletes those keep rejects; it returns how
// many remain and how many it removed. The userspace copy is rebuilt from
// the walk: what the walk saw and kept (up to affinityCopyEntries, those
// already in the copy first), plus what was written meanwhile.
func (a *Affinity) Sweep(keep func(backendID string, lastUsed time.Time) bool) (remaining, removed int, err error) {
	start := time.Now()
	a.mu.Lock()
	a.sweeping = start
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.sweeping = time.Time{}
		a.mu.Unlock()
	}()
	var cursor ebpf.MapBatchCursor
	keys := make([]proxyClientKey, sweepBatch)
	values := make([]proxyBinding, sweepBatch)
	var doomed []proxyClientKey
	seen := map[proxyClientKey]cachedBinding{}
	for {
		n, err := a.m.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			id, last := idString(values[i].BackendId), time.Unix(0, int64(values[i].LastUsedUnixNs))
			if keep(id, last) {
				remaining++
				b := cachedBinding{backendID: id, lastUsed: last, written: start}
				if len(seen) < affinityCopyEntries/2 || a.inCopy(keys[i]) {
					seen[keys[i]] = b
				}
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
		chunk := doomed[:min(len(doomed), sweepBatch)]
		if _, err := a.m.BatchDelete(chunk, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return remaining, removed, fmt.Errorf("delete expired bindings: %w", err)
		}
		removed += len(chunk)
		doomed = doomed[len(chunk):]
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, b := range a.cached {
		if !b.written.Before(start) {
			seen[k] = b // bound while the walk ran: newer than what it read
		}
	}
	for k := range seen {
		if len(seen) <= affinityCopyEntries {
			break
		}
		delete(seen, k)
	}
	a.cached = seen
	return remaining, removed, nil
}

func (a *Affinity) inCopy(key proxyClientKey) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.cached[key]
	return ok
}

// sweepBatch is how many bindings one bpf() call of a sweep reads or
// deletes: 4096 keys and values are about 300 KiB of buffers.
const sweepBatch = 4096
