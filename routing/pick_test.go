package routing

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// backend is a healthy backend with roomy limits; opts adjust it.
func backend(id, region, country string, opts ...func(*Backend)) Backend {
	b := Backend{
		ID: id, App: "app", Region: region, Country: country,
		Addr: netip.MustParseAddr("10.0.0.1"), Port: 8080,
		Healthy: true, Weight: 1, SoftLimit: 100, HardLimit: 200,
	}
	for _, o := range opts {
		o(&b)
	}
	return b
}

func unhealthy(b *Backend) { b.Healthy = false }

func limits(soft, hard int) func(*Backend) {
	return func(b *Backend) { b.SoftLimit, b.HardLimit = soft, hard }
}

func weight(w int) func(*Backend) { return func(b *Backend) { b.Weight = w } }

func mustTable(t testing.TB, bs []Backend, deleted ...string) *Table {
	t.Helper()
	tbl, err := NewTable(bs, deleted, nil)
	if err != nil {
		t.Fatalf("NewTable: %v", err)
	}
	return tbl
}

// activeByID turns a map of live counts by backend id into Input.Active.
func activeByID(tbl *Table, counts map[string]int) func(int) int {
	return func(i int) int { return counts[tbl.Backends[i].ID] }
}

var (
	frenchClient  = Client{Addr: netip.MustParseAddr("81.2.69.1"), Country: "FR", Region: "eu"}
	unknownClient = Client{Addr: netip.MustParseAddr("192.0.2.1")}
)

// pickBoth runs Pick and Explain and fails if they disagree.
func pickBoth(t *testing.T, in Input, tbl *Table) (winner string, sticky bool, reject RejectReason, d Decision) {
	t.Helper()
	w, sticky, reject := Pick(&in, tbl)
	d = Explain(in, tbl)
	if d.Winner != w || d.Sticky != sticky || d.Reject != reject {
		t.Fatalf("Pick = (%d, %v, %q), Explain = (%d, %v, %q)", w, sticky, reject, d.Winner, d.Sticky, d.Reject)
	}
	if w >= 0 {
		winner = tbl.Backends[w].ID
	}
	return winner, sticky, reject, d
}

func TestScore(t *testing.T) {
	tests := []struct {
		name                      string
		geo, active, soft, weight int
		want                      float64
	}{
		{"idle backend scores its geo tier", 2, 0, 100, 1, 200},
		{"load is active over soft limit", 0, 50, 100, 1, 0.5},
		{"weight divides the load", 1, 50, 100, 2, 100.25},
		{"zero soft limit counts as one", 2, 10, 0, 1, 210},
		{"zero weight counts as one", 0, 10, 5, 0, 2},
		{"load is not capped", 0, 500, 1, 1, 500},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Score(tc.geo, tc.active, tc.soft, tc.weight); got != tc.want {
				t.Errorf("Score(%d, %d, %d, %d) = %v, want %v", tc.geo, tc.active, tc.soft, tc.weight, got, tc.want)
			}
		})
	}
}

// TestSeedWorkedExample is the seed's example: a French client at a POP in
// region sa.
func TestSeedWorkedExample(t *testing.T) {
	tbl := mustTable(t, []Backend{
		backend("fr-1", "eu", "FR"),
		backend("de-1", "eu", "DE"),
		backend("eu-nocountry", "eu", ""),
		backend("br-1", "sa", "BR"),
		backend("ar-1", "sa", "AR"),
		backend("us-1", "us", "US"),
		backend("jp-1", "ap", "JP"),
	})
	wantGeo := map[string]int{
		"fr-1": GeoSameCountry, "de-1": GeoSameRegion, "eu-nocountry": GeoSameRegion,
		"br-1": GeoLocalRegion, "ar-1": GeoLocalRegion,
		"us-1": GeoElsewhere, "jp-1": GeoElsewhere,
	}
	clients := map[string]Client{
		"upper case":       frenchClient,
		"any case matches": {Addr: frenchClient.Addr, Country: "fr", Region: "EU"},
	}
	for name, c := range clients {
		t.Run(name, func(t *testing.T) {
			winner, _, _, d := pickBoth(t, Input{Client: c, LocalRegion: "sa"}, tbl)
			if winner != "fr-1" {
				t.Errorf("winner = %q, want fr-1", winner)
			}
			for _, cand := range d.Candidates {
				id := tbl.Backends[cand.Index].ID
				if cand.Geo != wantGeo[id] {
					t.Errorf("%s: geo = %d, want %d", id, cand.Geo, wantGeo[id])
				}
				if want := float64(wantGeo[id] * 100); cand.Score != want {
					t.Errorf("%s: score = %v, want %v", id, cand.Score, want)
				}
			}
		})
	}
}

// TestLocalPOPRule: a client whose country and region are unknown can only be
// placed by this POP's region.
func TestLocalPOPRule(t *testing.T) {
	tbl := mustTable(t, []Backend{
		backend("a-us", "us", "US"),
		backend("b-sa", "sa", "BR"),
		backend("c-none", "", ""),
	})
	winner, _, _, d := pickBoth(t, Input{Client: unknownClient, LocalRegion: "SA"}, tbl)
	if winner != "b-sa" {
		t.Errorf("winner = %q, want b-sa", winner)
	}
	for _, c := range d.Candidates {
		if c.Geo < GeoLocalRegion {
			t.Errorf("%s: geo = %d for an unknown client; want 2 or 3", tbl.Backends[c.Index].ID, c.Geo)
		}
	}
	// An empty backend region is not "this POP's region" even at a POP with
	// no region configured.
	_, _, _, d = pickBoth(t, Input{Client: unknownClient}, tbl)
	for _, c := range d.Candidates {
		if c.Geo != GeoElsewhere {
			t.Errorf("%s: geo = %d with no local region, want 3", tbl.Backends[c.Index].ID, c.Geo)
		}
	}
}

func TestPick(t *testing.T) {
	tests := []struct {
		name       string
		backends   []Backend
		deleted    []string
		client     Client
		local      string
		active     map[string]int
		bound      string
		wantWinner string
		wantSticky bool
		wantReject RejectReason
	}{
		{
			name:       "same country beats same region",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR")},
			client:     frenchClient,
			wantWinner: "b-fr",
		},
		{
			name:       "same region beats local region",
			backends:   []Backend{backend("a-br", "sa", "BR"), backend("b-de", "eu", "DE")},
			client:     frenchClient,
			local:      "sa",
			wantWinner: "b-de",
		},
		{
			name:       "local region beats elsewhere",
			backends:   []Backend{backend("a-jp", "ap", "JP"), backend("b-br", "sa", "BR")},
			client:     frenchClient,
			local:      "sa",
			wantWinner: "b-br",
		},
		{
			name:       "lower load wins within a tier",
			backends:   []Backend{backend("fr-1", "eu", "FR"), backend("fr-2", "eu", "FR")},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 50, "fr-2": 10},
			wantWinner: "fr-2",
		},
		{
			name:       "higher weight wins at equal load",
			backends:   []Backend{backend("fr-1", "eu", "FR"), backend("fr-2", "eu", "FR", weight(3))},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 50, "fr-2": 50},
			wantWinner: "fr-2",
		},
		{
			name:       "load can outweigh geo, as in the seed",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", limits(1, 0))},
			client:     frenchClient,
			active:     map[string]int{"b-fr": 150},
			wantWinner: "a-de",
		},
		{
			name:       "lone backend of the best tier just below the next tier's floor wins",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", limits(2, 0))},
			client:     frenchClient,
			active:     map[string]int{"b-fr": 199}, // 99.5 < 100
			wantWinner: "b-fr",
		},
		{
			name:       "lone backend of the best tier at the next tier's floor ties and loses on load",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", limits(1, 0))},
			client:     frenchClient,
			active:     map[string]int{"b-fr": 100}, // 100 == 100, fewer active wins
			wantWinner: "a-de",
		},
		{
			name:       "zero soft limit counts as one",
			backends:   []Backend{backend("fr-1", "eu", "FR", limits(0, 0)), backend("fr-2", "eu", "FR", limits(10, 0))},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 2, "fr-2": 10},
			wantWinner: "fr-2",
		},
		{
			name:       "zero weight counts as one",
			backends:   []Backend{backend("fr-1", "eu", "FR", weight(0)), backend("fr-2", "eu", "FR")},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 50, "fr-2": 40},
			wantWinner: "fr-2",
		},
		{
			name:       "unhealthy backend is excluded",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", unhealthy)},
			client:     frenchClient,
			wantWinner: "a-de",
		},
		{
			name:       "backend at its hard limit is excluded",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", limits(5, 10))},
			client:     frenchClient,
			active:     map[string]int{"b-fr": 10},
			wantWinner: "a-de",
		},
		{
			name:       "backend one below its hard limit is eligible",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR", limits(5, 10))},
			client:     frenchClient,
			active:     map[string]int{"b-fr": 9},
			wantWinner: "b-fr",
		},
		{
			name:       "hard limit zero means no limit",
			backends:   []Backend{backend("fr-1", "eu", "FR", limits(1, 0))},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 1_000_000},
			wantWinner: "fr-1",
		},
		{
			name:       "tie on score: fewer active connections wins",
			backends:   []Backend{backend("a-busy", "eu", "FR", limits(4, 0)), backend("z-quiet", "eu", "FR", limits(2, 0))},
			client:     frenchClient,
			active:     map[string]int{"a-busy": 4, "z-quiet": 2},
			wantWinner: "z-quiet",
		},
		{
			name: "tie on score and active: higher weight wins",
			backends: []Backend{
				backend("a-light", "eu", "FR", limits(4, 0)),
				backend("z-heavy", "eu", "FR", limits(2, 0), weight(2)),
			},
			client:     frenchClient,
			active:     map[string]int{"a-light": 4, "z-heavy": 4},
			wantWinner: "z-heavy",
		},
		{
			name:       "tie on idle backends: higher weight wins",
			backends:   []Backend{backend("a-light", "eu", "FR"), backend("z-heavy", "eu", "FR", weight(5))},
			client:     frenchClient,
			wantWinner: "z-heavy",
		},
		{
			name:       "full tie: smaller id wins",
			backends:   []Backend{backend("fr-2", "eu", "FR"), backend("fr-10", "eu", "FR"), backend("fr-1", "eu", "FR")},
			client:     frenchClient,
			wantWinner: "fr-1",
		},
		{
			name:       "zero weight ties with weight one",
			backends:   []Backend{backend("fr-2", "eu", "FR", weight(0)), backend("fr-1", "eu", "FR")},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 7, "fr-2": 7},
			wantWinner: "fr-1",
		},
		{
			name:       "negative live count counts as zero",
			backends:   []Backend{backend("a-de", "eu", "DE"), backend("b-fr", "eu", "FR")},
			client:     frenchClient,
			active:     map[string]int{"a-de": -500, "b-fr": 1},
			wantWinner: "b-fr",
		},
		{
			name:       "empty table is rejected as table_empty",
			client:     frenchClient,
			wantReject: RejectTableEmpty,
		},
		{
			name:       "table of deleted rows only is rejected as table_empty",
			deleted:    []string{"gone-1", "gone-2"},
			client:     frenchClient,
			wantReject: RejectTableEmpty,
		},
		{
			name:       "all unhealthy is rejected as none_healthy",
			backends:   []Backend{backend("fr-1", "eu", "FR", unhealthy), backend("us-1", "us", "US", unhealthy)},
			client:     frenchClient,
			bound:      "fr-1",
			wantReject: RejectNoneHealthy,
		},
		{
			name: "every healthy backend full is rejected as all_at_hard_limit",
			backends: []Backend{
				backend("fr-1", "eu", "FR", limits(1, 2)),
				backend("us-1", "us", "US", unhealthy),
				backend("us-2", "us", "US", limits(1, 3)),
			},
			client:     frenchClient,
			active:     map[string]int{"fr-1": 2, "us-2": 5},
			wantReject: RejectAllAtHardLimit,
		},
		{
			name:       "affinity keeps an eligible bound backend over a better one",
			backends:   []Backend{backend("fr-1", "eu", "FR"), backend("us-1", "us", "US")},
			client:     frenchClient,
			active:     map[string]int{"us-1": 150},
			bound:      "us-1",
			wantWinner: "us-1",
			wantSticky: true,
		},
		{
			name:       "affinity dropped when the bound backend is unhealthy",
			backends:   []Backend{backend("fr-1", "eu", "FR"), backend("us-1", "us", "US", unhealthy)},
			client:     frenchClient,
			bound:      "us-1",
			wantWinner: "fr-1",
		},
		{
			name:       "affinity dropped when the bound backend is at its hard limit",
			backends:   []Backend{backend("fr-1", "eu", "FR"), backend("us-1", "us", "US", limits(1, 3))},
			client:     frenchClient,
			active:     map[string]int{"us-1": 3},
			bound:      "us-1",
			wantWinner: "fr-1",
		},
		{
			name:       "affinity dropped when the bound backend is absent",
			backends:   []Backend{backend("fr-1", "eu", "FR")},
			deleted:    []string{"us-1"},
			client:     frenchClient,
			bound:      "us-1",
			wantWinner: "fr-1",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tbl := mustTable(t, tc.backends, tc.deleted...)
			in := Input{Client: tc.client, LocalRegion: tc.local, Active: activeByID(tbl, tc.active), BoundID: tc.bound}
			winner, sticky, reject, _ := pickBoth(t, in, tbl)
			if winner != tc.wantWinner || sticky != tc.wantSticky || reject != tc.wantReject {
				t.Errorf("got (%q, sticky %v, reject %q), want (%q, sticky %v, reject %q)",
					winner, sticky, reject, tc.wantWinner, tc.wantSticky, tc.wantReject)
			}
		})
	}
}

func TestExplainExclusions(t *testing.T) {
	tbl := mustTable(t, []Backend{
		backend("a-ok", "eu", "FR"),
		backend("b-sick", "eu", "FR", unhealthy),
		backend("c-full", "eu", "FR", limits(1, 4)),
	})
	d := Explain(Input{Client: frenchClient, Active: activeByID(tbl, map[string]int{"a-ok": 3, "c-full": 4})}, tbl)
	want := []Candidate{
		{Index: 0, Geo: GeoSameCountry, Active: 3, Score: 0.03},
		{Index: 1, Geo: GeoSameCountry, Excluded: ExcludedUnhealthy},
		{Index: 2, Geo: GeoSameCountry, Active: 4, Excluded: ExcludedAtHardLimit},
	}
	if !slices.Equal(d.Candidates, want) {
		t.Errorf("candidates = %+v, want %+v", d.Candidates, want)
	}
	if d.Client != frenchClient || d.Winner != 0 {
		t.Errorf("decision = %+v", d)
	}
}

func TestIPv6Backends(t *testing.T) {
	tbl := mustTable(t, []Backend{
		backend("v6", "eu", "FR", func(b *Backend) { b.Addr = netip.MustParseAddr("2001:db8::10") }),
		backend("v4mapped", "eu", "DE", func(b *Backend) { b.Addr = netip.MustParseAddr("::ffff:192.0.2.7") }),
	})
	v6 := tbl.Backends[tbl.Index("v6")]
	if got := v6.AddrPort().String(); got != "[2001:db8::10]:8080" {
		t.Errorf("AddrPort = %s, want [2001:db8::10]:8080", got)
	}
	if got := tbl.Backends[tbl.Index("v4mapped")].Addr; !got.Is4() {
		t.Errorf("IPv4-mapped address kept mapped: %s", got)
	}
	client := Client{Addr: netip.MustParseAddr("2a01:e0a::1"), Country: "FR", Region: "eu"}
	if winner, _, _, _ := pickBoth(t, Input{Client: client}, tbl); winner != "v6" {
		t.Errorf("winner = %q, want v6", winner)
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	tbl := benchTable(100)
	counts := make([]int, 100)
	in := Input{Client: frenchClient, LocalRegion: "sa", Active: func(i int) int { return counts[i] }, BoundID: "b-0042"}
	if n := testing.AllocsPerRun(200, func() { Pick(&in, tbl) }); n != 0 {
		t.Errorf("Pick allocates %v times per call", n)
	}
}

// referencePick is the rule written as plainly as possible: sort the eligible
// backends by (score, active, -weight, id) and take the first. Pick and
// Explain are checked against it.
func referencePick(in Input, tbl *Table) (int, bool, RejectReason) {
	type cand struct {
		i, active, weight int
		score             float64
	}
	var eligible []cand
	healthy := 0
	for i, b := range tbl.Backends {
		a := 0
		if in.Active != nil {
			a = max(in.Active(i), 0)
		}
		if !b.Healthy {
			continue
		}
		healthy++
		if b.HardLimit > 0 && a >= b.HardLimit {
			continue
		}
		geo := GeoElsewhere
		switch {
		case in.Client.Country != "" && equalFold(b.Country, in.Client.Country):
			geo = GeoSameCountry
		case in.Client.Region != "" && equalFold(b.Region, in.Client.Region):
			geo = GeoSameRegion
		case in.LocalRegion != "" && equalFold(b.Region, in.LocalRegion):
			geo = GeoLocalRegion
		}
		s := float64(geo)*100 + (float64(a)/float64(max(b.SoftLimit, 1)))/float64(max(b.Weight, 1))
		eligible = append(eligible, cand{i, a, max(b.Weight, 1), s})
	}
	if len(tbl.Backends) == 0 {
		return -1, false, RejectTableEmpty
	}
	for _, c := range eligible {
		if tbl.Backends[c.i].ID == in.BoundID {
			return c.i, true, ""
		}
	}
	if len(eligible) == 0 {
		if healthy == 0 {
			return -1, false, RejectNoneHealthy
		}
		return -1, false, RejectAllAtHardLimit
	}
	slices.SortFunc(eligible, func(x, y cand) int {
		return cmp.Or(cmp.Compare(x.score, y.score), cmp.Compare(x.active, y.active),
			cmp.Compare(y.weight, x.weight), cmp.Compare(tbl.Backends[x.i].ID, tbl.Backends[y.i].ID))
	})
	return eligible[0].i, false, ""
}

func equalFold(a, b string) bool {
	return len(a) == len(b) && normalizeRegion(a) == normalizeRegion(b)
}

func TestPickAgreesWithExplainOnRandomTables(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	regions := []string{"sa", "us", "eu", "ap", "", "SA", "eu-west-paris", "EU-West-Paris"}
	countries := []string{"BR", "AR", "US", "FR", "DE", "JP", "", "fr"}
	pickFrom := func(s []string) string { return s[rng.IntN(len(s))] }
	for iter := range 20000 {
		n := rng.IntN(indexedTableMin) // bitmaps, up to the last bit
		if iter%4 == 0 {
			n = indexedTableMin + rng.IntN(indexedTableMin) // per-key lists
		}
		bs := make([]Backend, n)
		for i := range bs {
			bs[i] = Backend{
				ID:        fmt.Sprintf("b%02d", rng.IntN(100)*100+i),
				Region:    pickFrom(regions),
				Country:   pickFrom(countries),
				Addr:      netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}),
				Port:      8080,
				Healthy:   rng.IntN(5) > 0,
				Weight:    rng.IntN(4),
				SoftLimit: rng.IntN(5),
				HardLimit: rng.IntN(8),
			}
		}
		tbl := mustTable(t, bs)
		counts := make([]int, n)
		for i := range counts {
			counts[i] = rng.IntN(10) - 1
			if rng.IntN(8) == 0 {
				// loads around and past a tier's width of 100
				counts[i] = rng.IntN(1300)
			}
		}
		in := Input{
			Client:      Client{Country: pickFrom(countries), Region: pickFrom(regions)},
			LocalRegion: pickFrom(regions),
			Active:      func(i int) int { return counts[i] },
		}
		if n > 0 && rng.IntN(3) == 0 {
			in.BoundID = tbl.Backends[rng.IntN(n)].ID
		} else if rng.IntN(5) == 0 {
			in.BoundID = "absent"
		}

		w, sticky, reject := Pick(&in, tbl)
		d := Explain(in, tbl)
		rw, rsticky, rreject := referencePick(in, tbl)
		if w != d.Winner || sticky != d.Sticky || reject != d.Reject || w != rw || sticky != rsticky || reject != rreject {
			t.Fatalf("iteration %d: Pick (%d %v %q), Explain (%d %v %q), reference (%d %v %q)\ninput %+v\nbackends %+v\ncounts %v",
				iter, w, sticky, reject, d.Winner, d.Sticky, d.Reject, rw, rsticky, rreject, in, tbl.Backends, counts)
		}
	}
}

func TestTableIndexAndRegionOf(t *testing.T) {
	tbl := mustTable(t, []Backend{backend("b", "eu", "FR"), backend("a", "eu", "FR"), backend("c", "eu", "FR")})
	for i, id := range []string{"a", "b", "c"} {
		if got := tbl.Index(id); got != i {
			t.Errorf("Index(%q) = %d, want %d", id, got, i)
		}
	}
	for _, id := range []string{"", "0", "bb", "d"} {
		if got := tbl.Index(id); got != -1 {
			t.Errorf("Index(%q) = %d, want -1", id, got)
		}
	}
	regionOf := map[string]string{
		"BR": "sa", "ec": "sa", "MX": "us", "fi": "eu", "GB": "eu", "NZ": "ap",
		"ZA": "us", // unknown countries are in the default region, as in the seed
		"":   "",   // no country, no region
	}
	for c, want := range regionOf {
		if got := tbl.RegionOf(c); got != want {
			t.Errorf("RegionOf(%q) = %q, want %q", c, got, want)
		}
	}
}

func TestNewTableRejectsDuplicateAndEmptyIDs(t *testing.T) {
	if _, err := NewTable([]Backend{backend("x", "", ""), backend("x", "", "")}, nil, nil); err == nil {
		t.Error("duplicate ids accepted")
	}
	if _, err := NewTable([]Backend{backend("", "", "")}, nil, nil); err == nil {
		t.Error("empty id accepted")
	}
}

func TestVersionFollowsContent(t *testing.T) {
	bs := []Backend{backend("a", "eu", "FR"), backend("b", "us", "US")}
	reversed := slices.Clone(bs)
	slices.Reverse(reversed)
	t1, t2 := mustTable(t, bs), mustTable(t, reversed)
	if t1.Version != t2.Version {
		t.Errorf("same content, different versions: %x %x", t1.Version, t2.Version)
	}
	bs[1].Weight = 2
	if t3 := mustTable(t, bs); t3.Version == t1.Version {
		t.Error("changed weight, same version")
	}
	if t4 := mustTable(t, bs[:1], "b"); t4.Version == t1.Version {
		t.Error("deleted row, same version")
	}
}

func TestPickWithLongNamesDoesNotAllocate(t *testing.T) {
	bs := []Backend{
		backend("a", "south-america-east", "BR"),
		backend("b", "europe-west-paris", "FR"),
	}
	tbl := mustTable(t, bs)
	in := Input{Client: Client{Country: "FR", Region: "Europe-West-Paris"}, LocalRegion: "SOUTH-AMERICA-EAST"}
	if w, _, _ := Pick(&in, tbl); w != 1 {
		t.Errorf("winner %d, want 1 (same country)", w)
	}
	in.Client.Country = ""
	if w, _, _, d := pickBoth(t, in, tbl); w != "b" || d.Candidates[1].Geo != GeoSameRegion || d.Candidates[0].Geo != GeoLocalRegion {
		t.Errorf("winner %q, candidates %+v", w, d.Candidates)
	}
	if n := testing.AllocsPerRun(100, func() { Pick(&in, tbl) }); n != 0 {
		t.Errorf("Pick allocates %v times per call with long region names", n)
	}
}

// TestPackNameFoldsCaseLikeStringsToLower checks the word-at-a-time case
// folding against strings.ToLower on every byte in every position of names
// of 1 to 7 bytes, and that only ASCII names are packed.
func TestPackNameFoldsCaseLikeStringsToLower(t *testing.T) {
	for length := 1; length <= 7; length++ {
		for pos := range length {
			for c := range 256 {
				name := []byte(strings.Repeat("Qz", 4)[:length])
				name[pos] = byte(c)
				s := string(name)
				got, ok := packName(s)
				if c >= 0x80 {
					if ok {
						t.Fatalf("packName(%q) packed a non-ASCII name", s)
					}
					continue
				}
				want, _ := packName(strings.ToLower(s))
				lower, _ := packName(strings.ToUpper(s))
				if !ok || got != want || got != lower {
					t.Fatalf("packName(%q) = %#x, %v; lower-case %#x, upper-case %#x", s, got, ok, want, lower)
				}
				var plain nameKey
				for i := range len(s) {
					plain |= nameKey(strings.ToLower(s)[i]) << (8 * i)
				}
				if plain|nameKey(len(s))<<56 != got {
					t.Fatalf("packName(%q) = %#x, want the lower-case bytes %#x", s, got, plain|nameKey(len(s))<<56)
				}
			}
		}
	}
	for _, s := range []string{"", "eightlon"} {
		if _, ok := packName(s); ok {
			t.Errorf("packName(%q) packed a name outside 1..7 bytes", s)
		}
	}
}
