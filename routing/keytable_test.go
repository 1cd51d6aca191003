package routing

import (
	"fmt"
	"testing"
)

// TestKeyTableFindsEveryKeyAndNothingElse fills tables of many sizes with
// packed and interned keys (so slots collide and probes wrap around the
// end) and checks each key's entry and the absence of keys never added.
func TestKeyTableFindsEveryKeyAndNothingElse(t *testing.T) {
	key := func(i int) nameKey {
		if i%5 == 4 {
			return internedBit | nameKey(i)
		}
		k, ok := packName(fmt.Sprintf("k%d", i))
		if !ok {
			t.Fatalf("k%d does not pack", i)
		}
		return k
	}
	for n := 0; n <= 300; n++ {
		kt := newKeyTable(n)
		if len(kt.entries) < 4*max(n, 1) || len(kt.entries)&(len(kt.entries)-1) != 0 {
			t.Fatalf("newKeyTable(%d) has %d slots, want a power of two of at least %d", n, len(kt.entries), 4*n)
		}
		for i := range n {
			e := kt.entry(key(i))
			e.mask |= uint32(i)
			e.backends = append(e.backends, int32(i))
		}
		for i := range n {
			if got := kt.backendsOf(key(i)); len(got) != 1 || got[0] != int32(i) {
				t.Fatalf("n=%d: backendsOf(key %d) = %v, want [%d]", n, i, got, i)
			}
			if got := kt.maskOf(key(i)); got != uint32(i) {
				t.Fatalf("n=%d: maskOf(key %d) = %d, want %d", n, i, got, i)
			}
		}
		for _, absent := range []nameKey{key(n), key(n + 1), key(1000 + n), unknownName} {
			if e := kt.find(absent); e != nil {
				t.Fatalf("n=%d: found %#x, which was never added", n, absent)
			}
		}
	}
}
