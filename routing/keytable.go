package routing

import "math/bits"

// keyTable finds the healthy backends that have a country or region key:
// open addressing with linear probing, at most a quarter full, so a lookup
// nearly always reads one slot. It replaces a Go map on the hot path, whose
// lookup costs several times as much for a uint64 key.
type keyTable struct {
	entries []keyEntry // len is a power of two
	shift   uint8      // 64 - log2(len(entries))
}

type keyEntry struct {
	key nameKey // emptyName marks a free slot; no client key is emptyName
	// mask has bit i set for healthy backend i, on tables below
	// indexedTableMin.
	mask uint32
	// backends lists the healthy backends, on larger tables.
	backends []int32
}

// newKeyTable sizes a table for up to n keys.
func newKeyTable(n int) keyTable {
	size := 1 << max(bits.Len(uint(4*max(n, 1)-1)), 3)
	return keyTable{entries: make([]keyEntry, size), shift: uint8(64 - bits.TrailingZeros(uint(size)))}
}

// slot is Fibonacci hashing: the top bits of key times 2^64/phi.
func (kt *keyTable) slot(key nameKey) uint64 {
	return (uint64(key) * 0x9E3779B97F4A7C15) >> kt.shift
}

// find returns the entry of key, or nil when no healthy backend has it.
func (kt *keyTable) find(key nameKey) *keyEntry {
	last := uint64(len(kt.entries) - 1)
	for i := kt.slot(key); ; i = (i + 1) & last {
		e := &kt.entries[i&last]
		if e.key == key {
			return e
		}
		if e.key == emptyName {
			return nil
		}
	}
}

// entry returns the entry of key, claiming a free slot for a new key.
func (kt *keyTable) entry(key nameKey) *keyEntry {
	last := uint64(len(kt.entries) - 1)
	for i := kt.slot(key); ; i = (i + 1) & last {
		e := &kt.entries[i&last]
		if e.key == key || e.key == emptyName {
			e.key = key
			return e
		}
	}
}

// maskOf is the bitmap of key's healthy backends, 0 when there are none.
func (kt *keyTable) maskOf(key nameKey) uint32 {
	if e := kt.find(key); e != nil {
		return e.mask
	}
	return 0
}

// backendsOf lists key's healthy backends.
func (kt *keyTable) backendsOf(key nameKey) []int32 {
	if e := kt.find(key); e != nil {
		return e.backends
	}
	return nil
}
