package routing

import (
	"math/bits"
	"net/netip"
)

// Client is what routing knows about the source of a connection.
type Client struct {
	Addr    netip.Addr // unmapped
	Country string     // ISO code (any case) or "" when unknown
	Region  string     // "" when unknown; usually Table.RegionOf(Country)
}

// Exclusion says why a backend cannot take a connection; "" means it can.
type Exclusion string

const (
	ExcludedUnhealthy   Exclusion = "unhealthy"     // healthy is 0 (or NULL) in routing.db
	ExcludedAtHardLimit Exclusion = "at_hard_limit" // live connections >= hard_limit > 0
)

// RejectReason says why no backend was picked. It is the `reason` label of
// edgeproxy_rejected_connections_total.
type RejectReason string

const (
	RejectTableEmpty     RejectReason = "table_empty"       // no backend that is not deleted
	RejectNoneHealthy    RejectReason = "none_healthy"      // every backend is unhealthy
	RejectAllAtHardLimit RejectReason = "all_at_hard_limit" // every healthy backend is full
)

// Input is one routing question.
type Input struct {
	Client      Client
	LocalRegion string          // this POP's region (EDGEPROXY_REGION)
	Active      func(i int) int // live connection count of Table.Backends[i]; nil: all 0
	BoundID     string          // the client's affinity binding, "" if none
}

// Geo tiers, lowest (best) first. A client whose country or region is unknown
// matches no backend on them, so only the local POP rule can apply to it.
const (
	GeoSameCountry = 0 // backend's country is the client's
	GeoSameRegion  = 1 // backend's region is the client's
	GeoLocalRegion = 2 // backend's region is this POP's
	GeoElsewhere   = 3
)

// Score is the seed's rule: geo*100 + (active/soft_limit)/weight, lowest
// wins, with soft_limit 0 and weight 0 counting as 1. Because the load term is
// not capped, a backend far over its soft limit can lose to one in a worse
// geo tier, as in the seed.
func Score(geo, active, softLimit, weight int) float64 {
	return score(geo, active, float64(max(softLimit, 1)), float64(max(weight, 1)))
}

// score is the one place the formula is evaluated, so Pick and Explain
// produce bit-identical scores. geo*100 is an integer product, which leaves
// the compiler no multiply-add to fuse differently in different callers.
func score(geo, active int, soft, weight float64) float64 {
	if active == 0 {
		return float64(geo * 100)
	}
	return float64(geo*100) + (float64(active)/soft)/weight
}

// beats reports whether candidate i is strictly better than the best so far.
// Ties are broken deterministically: lower score, then fewer active
// connections, then higher effective weight, then smaller ID. Backends are
// sorted by ID, so the index stands for the ID, and the order in which
// candidates are visited cannot change the result.
func beats(i int, s float64, active int, weight float64, best int, bestScore float64, bestActive int, bestWeight float64) bool {
	if s != bestScore {
		return s < bestScore
	}
	if active != bestActive {
		return active < bestActive
	}
	if weight != bestWeight {
		return weight > bestWeight
	}
	return i < best
}

type query struct{ country, region, local nameKey }

func (p *prepared) query(in *Input) query {
	return query{
		country: p.clientKey(in.Client.Country),
		region:  p.clientKey(in.Client.Region),
		local:   p.clientKey(in.LocalRegion),
	}
}

// geo is the tier of a backend for this query. A backend's empty name
// (emptyName) never equals a client's empty or unknown one (unknownName).
func (q query) geo(r *scoreRow) int {
	switch {
	case r.country == q.country:
		return GeoSameCountry
	case r.region == q.region:
		return GeoSameRegion
	case r.region == q.local:
		return GeoLocalRegion
	}
	return GeoElsewhere
}

// activeCount reads a live count. A negative count (a bookkeeping bug
// elsewhere) counts as 0, so that no score is ever below its geo tier's
// floor, which Pick's pruning relies on.
func activeCount(active func(int) int, i int) int {
	if active == nil {
		return 0
	}
	return max(active(i), 0)
}

func (r *scoreRow) atHardLimit(active int) bool {
	return r.hardLimit > 0 && active >= r.hardLimit
}

func rejectReason(backends int, sawHealthy bool) RejectReason {
	switch {
	case backends == 0:
		return RejectTableEmpty
	case !sawHealthy:
		return RejectNoneHealthy
	}
	return RejectAllAtHardLimit
}

// Pick chooses the backend for a new connection: the index into t.Backends
// of the winner, or -1 and the reason. If BoundID names an eligible backend
// it wins whatever its score (affinity) and sticky is true; a binding to a
// backend that is absent, unhealthy or at its hard limit is ignored.
//
// Pick is the hot path and does not allocate. Every score is at least its
// geo tier's floor (tier*100), so Pick visits backends tier by tier, best
// tier first, and stops as soon as the best score so far is below the next
// tier's floor; backends it never reaches have their live count unread.
func Pick(in *Input, t *Table) (winner int, sticky bool, reject RejectReason) {
	if t == nil || len(t.Backends) == 0 {
		return -1, false, RejectTableEmpty
	}
	p := t.prepared()
	if in.BoundID != "" {
		if i := t.Index(in.BoundID); i >= 0 {
			r := &p.rows[i]
			if r.healthy && !r.atHardLimit(activeCount(in.Active, i)) {
				return i, true, ""
			}
		}
	}

	// Field by field: a composite literal here compiles to a zeroed
	// temporary copied into place, whose mismatched loads cost more than
	// the scan of a small table.
	var pk picker
	pk.activeOf, pk.rows, pk.best = in.Active, p.rows, -1
	if len(p.rows) >= indexedTableMin {
		return pk.pickIndexed(p, in, len(t.Backends))
	}

	// A small table: each of the client's keys selects the bitmap of the
	// healthy backends in its tier. A key is worked out only when its tier
	// is reached, so a client whose own country settles the choice costs
	// one key and one bitmap.
	var visited uint32
	for tier := range GeoElsewhere + 1 {
		members := p.healthyMask
		if tier != GeoElsewhere {
			name, keys := p.tierName(in, tier)
			// clientKey, with its common case inlined
			key, ok := pairKey(name)
			if !ok {
				key = p.otherClientKey(name)
			}
			members = keys.maskOf(key)
		}
		members &^= visited
		visited |= members
		if pk.best < 0 && members != 0 && members&(members-1) == 0 {
			if i := bits.TrailingZeros32(members); loneWinner(in, &p.rows[i], i) {
				return i, false, ""
			}
		}
		for m := members; m != 0; m &= m - 1 {
			pk.consider(bits.TrailingZeros32(m), tier)
		}
		// Every backend not visited yet is in a tier above this one.
		if pk.settled(tier) {
			break
		}
	}
	return pk.result(len(t.Backends), p.healthyMask != 0)
}

// loneWinner reports whether backend i, the only healthy one in the best
// tier that has any, wins without its score being computed (which costs two
// dependent divisions): it is below its hard limit and its load term is
// below 100, so nothing in a later tier can beat it. active <
// 99*soft*weight bounds the load term below 100 with a margin of a whole
// unit, far beyond the two roundings of active/soft/weight, so the
// shortcut never disagrees with the formula.
func loneWinner(in *Input, r *scoreRow, i int) bool {
	a := activeCount(in.Active, i)
	return !r.atHardLimit(a) && float64(a) < 99*r.soft*r.weight
}

// tierName is the client-side name that selects the backends of tier
// (GeoSameCountry to GeoLocalRegion) and the key table they are found in.
func (p *prepared) tierName(in *Input, tier int) (string, *keyTable) {
	switch tier {
	case GeoSameCountry:
		return in.Client.Country, &p.byCountry
	case GeoSameRegion:
		return in.Client.Region, &p.byRegion
	}
	return in.LocalRegion, &p.byRegion
}

// settled reports whether the best so far is below the floor of the tier
// after tier.
func (pk *picker) settled(tier int) bool {
	return pk.best >= 0 && pk.score < float64((tier+1)*100)
}

// pickIndexed visits the client's country, then its region, then this POP's
// region, and falls back to every backend only when none of those produced a
// score below the next tier's floor. As on a small table, each key is
// worked out when its tier is reached; until then it is unknownName, which
// no backend has, so geo ranks the rows of a list correctly.
func (pk *picker) pickIndexed(p *prepared, in *Input, backends int) (int, bool, RejectReason) {
	q := query{country: unknownName, region: unknownName, local: unknownName}
	for tier, key := range [...]*nameKey{GeoSameCountry: &q.country, GeoSameRegion: &q.region, GeoLocalRegion: &q.local} {
		name, keys := p.tierName(in, tier)
		*key = p.clientKey(name)
		for _, i := range keys.backendsOf(*key) {
			pk.consider(int(i), q.geo(&pk.rows[i]))
		}
		if pk.settled(tier) {
			return pk.result(backends, true)
		}
	}
	sawHealthy := false
	for i := range pk.rows {
		if r := &pk.rows[i]; r.healthy {
			sawHealthy = true
			pk.consider(i, q.geo(r))
		}
	}
	return pk.result(backends, sawHealthy)
}

func (pk *picker) result(backends int, sawHealthy bool) (int, bool, RejectReason) {
	if pk.best < 0 {
		return -1, false, rejectReason(backends, sawHealthy)
	}
	return pk.best, false, ""
}

// picker is Pick's running best.
type picker struct {
	activeOf func(int) int
	rows     []scoreRow
	best     int
	score    float64
	active   int
	weight   float64
}

// consider scores healthy backend i in tier geo unless its tier's floor is
// already above the best score, in which case its live count is not read.
func (pk *picker) consider(i, geo int) {
	if pk.best >= 0 && float64(geo*100) > pk.score {
		return
	}
	r := &pk.rows[i]
	a := activeCount(pk.activeOf, i)
	if r.atHardLimit(a) {
		return
	}
	s := score(geo, a, r.soft, r.weight)
	if pk.best < 0 || beats(i, s, a, r.weight, pk.best, pk.score, pk.active, pk.weight) {
		pk.best, pk.score, pk.active, pk.weight = i, s, a, r.weight
	}
}

// Candidate is one backend as Explain saw it. Score is meaningful only when
// Excluded is "".
type Candidate struct {
	Index    int // into Table.Backends
	Geo      int // GeoSameCountry .. GeoElsewhere
	Active   int
	Score    float64
	Excluded Exclusion
}

// Decision is a routing decision with its working.
type Decision struct {
	Client      Client
	LocalRegion string
	Candidates  []Candidate // in table order
	Winner      int         // index into Table.Backends, -1 when rejected
	Sticky      bool        // the winner is the client's affinity binding
	Reject      RejectReason
}

// Explain computes the same result as Pick plus every backend's geo tier,
// live count, and score or exclusion. `edgeproxy route` and debug logs use
// it; it allocates the Candidates slice.
func Explain(in Input, t *Table) Decision {
	d := Decision{Client: in.Client, LocalRegion: in.LocalRegion, Winner: -1}
	if t == nil {
		d.Reject = RejectTableEmpty
		return d
	}
	p := t.prepared()
	q := p.query(&in)
	d.Candidates = make([]Candidate, len(p.rows))

	best := -1
	sawHealthy := false
	for i := range p.rows {
		r := &p.rows[i]
		c := Candidate{Index: i, Geo: q.geo(r), Active: activeCount(in.Active, i)}
		switch {
		case !r.healthy:
			c.Excluded = ExcludedUnhealthy
		case r.atHardLimit(c.Active):
			sawHealthy = true
			c.Excluded = ExcludedAtHardLimit
		default:
			sawHealthy = true
			c.Score = score(c.Geo, c.Active, r.soft, r.weight)
			if best < 0 {
				best = i
			} else if b := &d.Candidates[best]; beats(i, c.Score, c.Active, r.weight, best, b.Score, b.Active, p.rows[best].weight) {
				best = i
			}
		}
		d.Candidates[i] = c
	}

	if in.BoundID != "" {
		if i := t.Index(in.BoundID); i >= 0 && d.Candidates[i].Excluded == "" {
			d.Winner, d.Sticky = i, true
			return d
		}
	}
	if best < 0 {
		d.Reject = rejectReason(len(t.Backends), sawHealthy)
		return d
	}
	d.Winner = best
	return d
}
