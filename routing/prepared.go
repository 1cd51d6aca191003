package routing

import (
	"math"
	"strings"
)

// prepared is the scoring view of a Table, built once per load so that Pick
// neither folds case nor converts integers per backend.
type prepared struct {
	rows []scoreRow
	// interned holds the keys of names too long or too exotic to pack.
	interned map[string]nameKey
	// byCountry and byRegion find the healthy backends of each key. On a
	// small table (below indexedTableMin) an entry is a bitmap, so Pick files
	// every backend under its geo tier with a few mask operations. On a
	// larger one it is a list: Pick looks at the client's country and regions
	// first and stops as soon as no backend elsewhere could beat what it
	// found.
	byCountry, byRegion keyTable
	healthyMask         uint32 // small tables only
}

type scoreRow struct {
	country, region nameKey
	hardLimit       int
	// soft and weight are effective (0 counts as 1) and already converted,
	// exactly as float64(int) would convert them in the formula.
	soft, weight float64
	healthy      bool
}

// indexedTableMin is where Pick switches from bitmaps of backends to
// per-key lists: a bitmap is a uint32, so up to 32 backends. Bitmaps are
// the faster of the two at every size they can hold (measured at 10, 16,
// 24 and 31 backends: 5% to 25% ahead).
const indexedTableMin = 33

// nameKey identifies a lower-cased country or region name. A name of 1 to 7
// ASCII bytes is packed into the key itself (length in the top byte), so
// keys of the client's names are computed, not looked up; longer or
// non-ASCII names are interned per table.
type nameKey uint64

const (
	emptyName   nameKey = 0              // a backend's empty country or region
	unknownName nameKey = math.MaxUint64 // a client's empty or unheard-of name
	internedBit nameKey = 1 << 63
)

// packName lower-cases s into a key, or reports that s does not fit. The
// case folding works on all bytes of the word at once: a byte of 'A'..'Z'
// is the only one for which adding 0x80-'A' sets its top bit and adding
// 0x80-'Z'-1 does not, and no byte below 0x80 carries into its neighbour.
func packName(s string) (nameKey, bool) {
	if len(s) == 0 || len(s) > 7 {
		return 0, false
	}
	var k uint64
	for i := 0; i < len(s); i++ {
		k |= uint64(s[i]) << (8 * i)
	}
	const ones, tops = 0x0101010101010101, 0x8080808080808080
	if k&tops != 0 {
		return 0, false
	}
	upper := (k + ones*(0x80-'A')) &^ (k + ones*(0x80-'Z'-1)) & tops
	return nameKey(k | upper>>2 | uint64(len(s))<<56), true
}

func prepare(bs []Backend) *prepared {
	p := &prepared{
		rows:      make([]scoreRow, len(bs)),
		byCountry: newKeyTable(len(bs)),
		byRegion:  newKeyTable(len(bs)),
	}
	small := len(bs) < indexedTableMin
	for i := range bs {
		b := &bs[i]
		r := scoreRow{
			country:   p.backendKey(b.Country),
			region:    p.backendKey(b.Region),
			hardLimit: b.HardLimit,
			soft:      float64(max(b.SoftLimit, 1)),
			weight:    float64(max(b.Weight, 1)),
			healthy:   b.Healthy,
		}
		p.rows[i] = r
		if !r.healthy {
			continue
		}
		for _, kt := range [...]struct {
			table *keyTable
			key   nameKey
		}{{&p.byCountry, r.country}, {&p.byRegion, r.region}} {
			if kt.key == emptyName {
				continue
			}
			e := kt.table.entry(kt.key)
			if small {
				e.mask |= 1 << i
			} else {
				e.backends = append(e.backends, int32(i))
			}
		}
		if small {
			p.healthyMask |= 1 << i
		}
	}
	return p
}

func (p *prepared) backendKey(s string) nameKey {
	if s == "" {
		return emptyName
	}
	if k, ok := packName(s); ok {
		return k
	}
	s = strings.ToLower(s)
	k, ok := p.interned[s]
	if !ok {
		if p.interned == nil {
			p.interned = make(map[string]nameKey)
		}
		k = internedBit | nameKey(len(p.interned)+1)
		p.interned[s] = k
	}
	return k
}

// clientKey finds the key of a client-side name (any case) without
// allocating. Two-byte names (ISO country codes and the built-in regions)
// take the shortest path.
func (p *prepared) clientKey(s string) nameKey {
	if k, ok := pairKey(s); ok {
		return k
	}
	return p.otherClientKey(s)
}

// pairKey is packName for a two-byte ASCII name, small enough for the
// compiler to inline.
func pairKey(s string) (nameKey, bool) {
	if len(s) != 2 {
		return 0, false
	}
	k := uint64(s[0]) | uint64(s[1])<<8
	upper := (k + 0x3f3f) &^ (k + 0x2525) & 0x8080 // as in packName
	return nameKey(2<<56 | k | upper>>2), k&0x8080 == 0
}

func (p *prepared) otherClientKey(s string) nameKey {
	if s == "" {
		return unknownName
	}
	if k, ok := packName(s); ok {
		return k
	}
	return p.longClientKey(s)
}

// longClientKey lower-cases a long name on the stack for the map index,
// which does not copy string(bytes).
func (p *prepared) longClientKey(s string) nameKey {
	var buf [64]byte
	if len(s) > len(buf) {
		return p.internedKey(strings.ToLower(s))
	}
	b := buf[:len(s)]
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 0x80:
			// Only strings.ToLower agrees with how the key was made.
			return p.internedKey(strings.ToLower(s))
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
		}
		b[i] = c
	}
	if k, ok := p.interned[string(b)]; ok {
		return k
	}
	return unknownName
}

func (p *prepared) internedKey(lower string) nameKey {
	if k, ok := p.interned[lower]; ok {
		return k
	}
	return unknownName
}

// prepared returns the scoring view; a Table assembled as a literal rather
// than by LoadTable or NewTable gets one built on the spot.
func (t *Table) prepared() *prepared {
	if t.prep != nil && len(t.prep.rows) == len(t.Backends) {
		return t.prep
	}
	return prepare(t.Backends)
}
