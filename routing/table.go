package routing

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Backend is one validated row of the backends table.
//
// Country is stored upper-case and Region lower-case, so that tables loaded
// from differently typed rows compare and print alike.
type Backend struct {
	ID, App, Region, Country string
	Addr                     netip.Addr // wg_ip; IPv4 or IPv6, IPv4-mapped IPv6 unmapped
	Port                     uint16
	Healthy                  bool
	Weight                   int
	SoftLimit                int
	HardLimit                int // 0: no limit
	// ProxyProtocol is the PROXY protocol header sent to the backend
	// ahead of the client's bytes: 0 none, 1 v1 (text), 2 v2 (binary).
	ProxyProtocol int
}

// AddrPort is the address the proxy dials.
func (b *Backend) AddrPort() netip.AddrPort { return netip.AddrPortFrom(b.Addr, b.Port) }

// Table is an immutable routing snapshot. Never mutate it after LoadTable or
// NewTable returns: the proxy reads it from many goroutines without locks.
type Table struct {
	Backends []Backend         // sorted by ID (byte order); rows with deleted=1 are not included
	Deleted  []string          // ids of rows with deleted=1, sorted, for explanations
	Regions  map[string]string // upper-case country -> region: built-in map overlaid by the regions table
	// Pops are the valid, not deleted rows of the pops table (the
	// WireGuard overlay), sorted by ID; nil without a pops table. They are
	// read with the backends in one transaction, so one change watcher
	// drives both the routing and the overlay.
	Pops    []Pop
	Version uint64 // hash of the content above: equal tables have equal versions
	// LoadedAt is when this content was read. A reload that finds the same
	// content keeps the older snapshot, so it is when the content was first
	// seen.
	LoadedAt time.Time

	// prep is what Pick needs in a cache-friendly shape, built once so the
	// hot path neither lower-cases strings nor converts integers.
	prep *prepared
}

// DefaultRegion is the region of any country the region map does not name.
const DefaultRegion = "us"

// builtinRegions is the seed's country -> region map.
var builtinRegions = func() map[string]string {
	m := make(map[string]string)
	for region, countries := range map[string]string{
		"sa": "BR AR CL PE CO UY PY BO EC",
		"us": "US CA MX",
		"eu": "PT ES FR DE NL IT GB IE BE CH AT PL CZ SE NO DK FI",
		"ap": "JP KR TW HK SG MY TH VN ID PH AU NZ",
	} {
		for _, c := range strings.Fields(countries) {
			m[c] = region
		}
	}
	return m
}()

// BuiltinRegions returns a copy of the built-in country -> region map.
func BuiltinRegions() map[string]string { return maps.Clone(builtinRegions) }

// RegionOf maps a country code (any case) to its region. An unknown country
// is in DefaultRegion, as in the seed; an empty country has no region, which
// leaves the client to the local POP rule.
func (t *Table) RegionOf(country string) string {
	if country == "" {
		return ""
	}
	regions := builtinRegions
	if t != nil && t.Regions != nil {
		regions = t.Regions
	}
	if r, ok := regions[strings.ToUpper(country)]; ok {
		return r
	}
	return DefaultRegion
}

// Index returns the position of the backend with this id in t.Backends, or
// -1 when absent.
func (t *Table) Index(id string) int {
	if t == nil {
		return -1
	}
	// By hand rather than sort.Search: Pick calls this for every bound
	// client, and an indirect call per step is most of the cost.
	lo, hi := 0, len(t.Backends)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if t.Backends[mid].ID < id {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo < len(t.Backends) && t.Backends[lo].ID == id {
		return lo
	}
	return -1
}

// NewTable builds a Table from backends that are already valid (LoadTable's
// validation is not repeated). It copies its inputs, sorts backends by ID,
// normalizes the case of countries and regions, overlays regionOverrides
// (country -> region) on the built-in map, and computes Version. Tests and
// tools use it to route without a database.
func NewTable(backends []Backend, deleted []string, regionOverrides map[string]string) (*Table, error) {
	return newTable(backends, deleted, regionOverrides, nil)
}

// NewTableWithPops is NewTable for a table that also carries the overlay's
// pops, already valid (LoadPops's rules are not applied again). Pops are
// copied and sorted by ID.
func NewTableWithPops(backends []Backend, deleted []string, regionOverrides map[string]string, pops []Pop) (*Table, error) {
	return newTable(backends, deleted, regionOverrides, pops)
}

func newTable(backends []Backend, deleted []string, regionOverrides map[string]string, pops []Pop) (*Table, error) {
	bs := slices.Clone(backends)
	for i := range bs {
		bs[i].Country = normalizeCountry(bs[i].Country)
		bs[i].Region = normalizeRegion(bs[i].Region)
		bs[i].Addr = bs[i].Addr.Unmap()
	}
	slices.SortFunc(bs, func(a, b Backend) int { return cmp.Compare(a.ID, b.ID) })
	for i := range bs {
		if bs[i].ID == "" {
			return nil, fmt.Errorf("backend with empty id (address %s)", bs[i].AddrPort())
		}
		if i > 0 && bs[i].ID == bs[i-1].ID {
			return nil, fmt.Errorf("backend %q: duplicate id", bs[i].ID)
		}
	}
	del := slices.Clone(deleted)
	slices.Sort(del)
	del = slices.Compact(del)

	regions := BuiltinRegions()
	for c, r := range regionOverrides {
		regions[normalizeCountry(c)] = normalizeRegion(r)
	}

	ps := make([]Pop, len(pops))
	for i, p := range pops {
		p.AllowedIPs = slices.Clone(p.AllowedIPs)
		ps[i] = p
	}
	slices.SortStableFunc(ps, func(a, b Pop) int { return cmp.Compare(a.ID, b.ID) })
	if len(ps) == 0 {
		ps = nil
	}

	t := &Table{
		Backends: bs,
		Deleted:  del,
		Regions:  regions,
		Pops:     ps,
		LoadedAt: time.Now(),
	}
	t.Version = t.contentHash()
	t.prep = prepare(bs)
	return t, nil
}

func normalizeCountry(s string) string { return strings.ToUpper(strings.TrimSpace(s)) }
func normalizeRegion(s string) string  { return strings.ToLower(strings.TrimSpace(s)) }

// contentHash is stable across processes and machines, so two POPs that
// loaded the same database report the same routing version.
func (t *Table) contentHash() uint64 {
	h := sha256.New()
	var num [8]byte
	writeInt := func(v int64) {
		binary.BigEndian.PutUint64(num[:], uint64(v))
		h.Write(num[:])
	}
	// Length-prefixed, so ("ab","c") and ("a","bc") differ.
	writeString := func(s string) {
		writeInt(int64(len(s)))
		h.Write([]byte(s))
	}
	writeBool := func(v bool) {
		if v {
			writeInt(1)
		} else {
			writeInt(0)
		}
	}

	writeInt(int64(len(t.Backends)))
	for _, b := range t.Backends {
		writeString(b.ID)
		writeString(b.App)
		writeString(b.Region)
		writeString(b.Country)
		writeString(b.Addr.String()) // with its zone: fe80::1%eth0 and %eth1 are different backends
		writeInt(int64(b.Port))
		writeBool(b.Healthy)
		writeInt(int64(b.Weight))
		writeInt(int64(b.SoftLimit))
		writeInt(int64(b.HardLimit))
		writeInt(int64(b.ProxyProtocol))
	}
	writeInt(int64(len(t.Deleted)))
	for _, id := range t.Deleted {
		writeString(id)
	}
	countries := slices.Sorted(maps.Keys(t.Regions))
	writeInt(int64(len(countries)))
	for _, c := range countries {
		writeString(c)
		writeString(t.Regions[c])
	}
	// No pops: nothing written, so a table without an overlay keeps the
	// version earlier releases gave it.
	if len(t.Pops) == 0 {
		return binary.BigEndian.Uint64(h.Sum(nil))
	}
	writeInt(int64(len(t.Pops)))
	for _, p := range t.Pops {
		writeString(p.ID)
		writeString(p.Region)
		h.Write(p.PublicKey[:])
		writeString(p.Endpoint)
		writeString(p.WGIP.String())
		writeInt(int64(len(p.AllowedIPs)))
		for _, a := range p.AllowedIPs {
			writeString(a.String())
		}
	}
	return binary.BigEndian.Uint64(h.Sum(nil))
}
