package routing

import "net/netip"

// Client is what routing knows about the source of a connection.
type Client struct {
	Addr    netip.Addr // unmapped
	Country string     // ISO code (any case) or "" when unknown
	Region  string     // "" when unknown; usually Table.RegionOf(Country)
}

// Exclusion says why a backend cannot take a connection; "" means it can.
type Exclusion string

const (
	ExcludedUnhealthy   Exclusion = "unhealthy"
	ExcludedAtHardLimit Exclusion = "at_hard_limit"
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

// beats reports whether a candidate is strictly better than the best so far.
// Ties are broken deterministically: lower score, then fewer active
// connections, then higher effective weight. Candidates are visited in table
// order, which is ID order, so a full tie keeps the smaller ID.
func beats(s float64, active int, weight float64, bestScore float64, bestActive int, bestWeight float64) bool {
	if s != bestScore {
		return s < bestScore
	}
	if active != bestActive {
		return active < bestActive
	}
	return weight > bestWeight
}

type query struct{ country, region, local int32 }

func (p *prepared) query(in *Input) query {
	return query{
		country: p.key(in.Client.Country),
		region:  p.key(in.Client.Region),
		local:   p.key(in.LocalRegion),
	}
}

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

// active reads a live count; a negative count (a bookkeeping bug elsewhere)
// counts as 0, so that no score is ever below its geo tier's floor, which
// Pick's pruning relies on.
func (in *Input) active(i int) int {
	if in.Active == nil {
		return 0
	}
	return max(in.Active(i), 0)
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
// Pick is the hot path and does not allocate. It calls Active only for
// backends that could still win: a candidate whose geo tier alone puts it
// above the best score so far is skipped unread.
func Pick(in Input, t *Table) (winner int, sticky bool, reject RejectReason) {
	if len(t.Backends) == 0 {
		return -1, false, RejectTableEmpty
	}
	p := t.prepared()
	if in.BoundID != "" {
		if i := t.Index(in.BoundID); i >= 0 {
			r := &p.rows[i]
			if r.healthy && !r.atHardLimit(in.active(i)) {
				return i, true, ""
			}
		}
	}

	q := p.query(&in)
	best, bestActive := -1, 0
	var bestScore, bestWeight float64
	sawHealthy := false
	for i := range p.rows {
		r := &p.rows[i]
		if !r.healthy {
			continue
		}
		sawHealthy = true
		geo := q.geo(r)
		if best >= 0 && float64(geo*100) > bestScore {
			continue
		}
		a := in.active(i)
		if r.atHardLimit(a) {
			continue
		}
		s := score(geo, a, r.soft, r.weight)
		if best < 0 || beats(s, a, r.weight, bestScore, bestActive, bestWeight) {
			best, bestScore, bestActive, bestWeight = i, s, a, r.weight
		}
	}
	if best < 0 {
		return -1, false, rejectReason(len(t.Backends), sawHealthy)
	}
	return best, false, ""
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
	p := t.prepared()
	q := p.query(&in)
	d.Candidates = make([]Candidate, len(p.rows))

	best := -1
	sawHealthy := false
	for i := range p.rows {
		r := &p.rows[i]
		c := Candidate{Index: i, Geo: q.geo(r), Active: in.active(i)}
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
			} else if b := &d.Candidates[best]; beats(c.Score, c.Active, r.weight, b.Score, b.Active, p.rows[best].weight) {
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
