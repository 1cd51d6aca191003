package userspace

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/routing"
)

// backendState is the live side of one backend: counters that outlive
// routing snapshots, keyed by backend id.
type backendState struct {
	id          string
	index       uint32 // stable slot for the per-backend BPF byte counters
	active      atomic.Int64
	total       atomic.Uint64
	connectErrs atomic.Uint64
	bytesIn     atomic.Uint64 // client to backend, splice plane
	bytesOut    atomic.Uint64 // backend to client, splice plane
	retries     atomic.Uint64 // connections retried elsewhere after a dial here failed
	health      health
}

// Lease is one reserved connection slot on a backend. The slot is taken at
// decision time, before dialling, so concurrent accepts cannot overshoot a
// hard limit; Release gives it back exactly once.
type Lease struct {
	Backend  routing.Backend
	Client   routing.Client
	Sticky   bool
	state    *backendState
	balancer *Balancer
	released atomic.Bool
	// tried are the backends whose dial failed for this client
	// connection before this lease, so a retry never picks them again.
	tried []string
	// lastUsed and hadEntry are what the affinity lookup found; the
	// binding is written only once a dial succeeded (Connected).
	lastUsed time.Time
	hadEntry bool
	// eligible is how many backends the table it was picked from allows,
	// read under the lock that reserved it: no lock again per dial.
	eligible int
}

// Connected records that the backend answered: it counts as a passing
// check, and the client's binding moves to (or is refreshed on) this
// backend. A binding is never written for a backend that did not answer.
func (l *Lease) Connected() {
	b := l.balancer
	b.observe(l.state, nil)
	if b.Affinity == nil {
		return
	}
	now := b.Now()
	// Refreshing costs a map write; a binding used within the last second
	// is fresh enough for any TTL measured in seconds.
	if l.Sticky && now.Sub(l.lastUsed) <= time.Second {
		return
	}
	if err := b.Affinity.Bind(l.Client.Addr, l.Backend.ID, now); err != nil {
		b.affinityErrors.Add(1)
	} else if !l.hadEntry {
		b.bindings.Add(1)
		b.newBindings.Add(1)
		l.hadEntry = true
	}
}

// Failed records a dial of the lease's backend that failed (refused, timed
// out, reset): a connect error, and a failed check for its health. It
// releases the slot.
func (l *Lease) Failed(err error) {
	l.state.connectErrs.Add(1)
	l.balancer.observe(l.state, err)
	l.Release()
}

// Attempts is how many backends this connection has tried, this one
// included.
func (l *Lease) Attempts() int { return len(l.tried) + 1 }

// Release frees the lease's slot. Safe to call more than once.
func (l *Lease) Release() {
	if l.released.CompareAndSwap(false, true) {
		l.state.active.Add(-1)
		if b := l.balancer; b != nil && b.Mirror != nil {
			b.Mirror.ReleaseActive(l.state.index)
			if b.handedOver.Load() {
				select { // the successor hears of it (reportActive)
				case b.released <- struct{}{}:
				default:
				}
			}
		}
	}
}

// Balancer turns a client address into a backend lease using the current
// routing snapshot and live connection counts.
type Balancer struct {
	Store       TableSource
	Geo         *routing.GeoSource // nil: clients have no country
	LocalRegion string
	Now         func() time.Time
	Affinity    AffinityStore // nil: no affinity
	BindingTTL  time.Duration
	Mirror      BackendMirror // nil: no BPF backends map
	Health      HealthConfig
	Log         *slog.Logger // nil: no log lines for health transitions

	// healthGen changes whenever a backend flips up or down, so the
	// table decisions use is rebuilt only then.
	healthGen atomic.Uint64
	panicking atomic.Bool
	eff       effectiveTable // guarded by mu
	freeSlots []uint32       // BPF slots of backends gone and idle, guarded by mu
	nextSlot  uint32         // guarded by mu

	handedOver     atomic.Bool   // a successor owns the shared backend table
	released       chan struct{} // set before handedOver: a release since the last report
	bindings       atomic.Int64  // bindings held: counted at each sweep, plus new ones since
	newBindings    atomic.Int64  // entries ever added: a sweep whose walk saw none added is exact
	affinityErrors atomic.Uint64

	mu       sync.Mutex // serializes decide+reserve so hard limits hold
	byID     map[string]*backendState
	view     *tableView
	rejected sync.Map // routing.RejectReason -> *atomic.Uint64
}

// TableSource is where the balancer reads the current routing table:
// the routing.Store, or a fixed table in tests.
type TableSource interface {
	Current() *routing.Table
}

// tableView aligns live states with one snapshot's backend order, so Pick
// reads counts by index without a map lookup per backend.
type tableView struct {
	table  *routing.Table
	states []*backendState
}

func (b *Balancer) viewFor(t *routing.Table) *tableView {
	if b.view != nil && b.view.table == t {
		return b.view
	}
	if b.byID == nil {
		b.byID = map[string]*backendState{}
	}
	v := &tableView{table: t, states: make([]*backendState, len(t.Backends))}
	for i := range t.Backends {
		id := t.Backends[i].ID
		st, ok := b.byID[id]
		if !ok {
			st = &backendState{id: id, index: b.allocSlot()}
			st.health.since = b.Now()
			b.byID[id] = st
		}
		v.states[i] = st
	}
	b.view = v
	return v
}

// allocSlot hands out a BPF backend slot, reusing those of backends that
// are gone and idle, so a long-lived process never runs out of them.
func (b *Balancer) allocSlot() uint32 {
	if n := len(b.freeSlots); n > 0 {
		slot := b.freeSlots[n-1]
		b.freeSlots = b.freeSlots[:n-1]
		return slot
	}
	b.nextSlot++
	return b.nextSlot - 1
}

// effectiveTable is the table decisions use, derived from the store's
// snapshot and the health generation it was built for.
type effectiveTable struct {
	base  *routing.Table
	gen   uint64
	table *routing.Table
	// eligible counts the backends decisions may pick (hard limits
	// aside): how many different backends one connection can try.
	eligible int
}

// routingTable is the store's snapshot with the backends that checks hold
// down marked unhealthy, unless that leaves no backend up: then every
// backend routing.db allows is used (panic routing, as Envoy's panic
// threshold does), since refusing everyone is worse than trying them.
// Called with mu held.
func (b *Balancer) routingTable() *routing.Table {
	base := b.Store.Current()
	gen := b.healthGen.Load()
	if b.eff.base == base && b.eff.gen == gen && b.eff.table != nil {
		return b.eff.table
	}
	table, panicking := base, false
	var down []int
	up := 0
	for i := range base.Backends {
		be := &base.Backends[i]
		if !be.Healthy {
			continue
		}
		if st := b.byID[be.ID]; st != nil && st.health.isDown() {
			down = append(down, i)
		} else {
			up++
		}
	}
	switch {
	case len(down) == 0:
	case up == 0:
		panicking = true
	default:
		bs := slices.Clone(base.Backends)
		for _, i := range down {
			bs[i].Healthy = false
		}
		if t, err := routing.NewTable(bs, base.Deleted, base.Regions); err == nil {
			table = t
		} else if b.Log != nil {
			b.Log.Error("cannot apply health checks to the routing table", "err", err)
		}
	}
	if b.panicking.Swap(panicking) != panicking && b.Log != nil {
		if panicking {
			b.Log.Warn("panic routing on: checks hold every backend down, routing to all of them", "backends", len(down))
		} else {
			b.Log.Info("panic routing off: a backend is up again")
		}
	}
	eligible := 0
	for i := range table.Backends {
		if table.Backends[i].Healthy {
			eligible++
		}
	}
	b.eff = effectiveTable{base: base, gen: gen, table: table, eligible: eligible}
	return table
}

// AttemptsLeft is how many backends a connection holding l may still try,
// this one included: the retries left, and no more than the eligible
// backends it has not tried. The connect budget is split over these, so a
// lone backend gets all of it.
func (l *Lease) AttemptsLeft(retries int) int {
	return max(min(retries+2-l.Attempts(), l.eligible-len(l.tried)), 1)
}

// Panicking reports whether panic routing is on.
func (b *Balancer) Panicking() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.routingTable()
	return b.panicking.Load()
}

// Client resolves the geography of a client address.
func (b *Balancer) Client(addr netip.Addr) routing.Client {
	addr = addr.Unmap()
	c := routing.Client{Addr: addr}
	if b.Geo != nil {
		if g := b.Geo.Current(); g != nil {
			c.Country = g.Country(addr)
		}
	}
	if c.Country != "" {
		c.Region = b.Store.Current().RegionOf(c.Country)
	}
	return c
}

// Acquire decides where the client goes and reserves a slot there. A
// client bound to a backend that is still eligible stays with it.
func (b *Balancer) Acquire(client netip.Addr) (*Lease, routing.RejectReason) {
	client = client.Unmap()
	c := b.Client(client)
	now := b.Now()
	var bound string
	var lastUsed time.Time
	var hadEntry bool // even an expired one: rebinding it adds no entry
	if b.Affinity != nil {
		id, last, ok, err := b.Affinity.Lookup(client)
		if err != nil {
			b.affinityErrors.Add(1)
		} else if ok {
			hadEntry = true
			if now.Sub(last) <= b.BindingTTL {
				bound, lastUsed = id, last
			}
		}
	}
	b.mu.Lock()
	t := b.routingTable()
	v := b.viewFor(t)
	in := routing.Input{
		Client:      c,
		LocalRegion: b.LocalRegion,
		Active:      func(i int) int { return int(b.activeOf(v.states[i])) },
		BoundID:     bound,
	}
	var lease *Lease
	var sticky bool
	for range reserveAttempts {
		var winner int
		var reject routing.RejectReason
		winner, sticky, reject = routing.Pick(&in, t)
		if winner < 0 {
			b.mu.Unlock()
			b.countReject(reject)
			return nil, reject
		}
		if lease = b.reserve(v, winner); lease != nil {
			break
		}
	}
	b.mu.Unlock()
	if lease == nil {
		b.countReject(routing.RejectAllAtHardLimit)
		return nil, routing.RejectAllAtHardLimit
	}
	lease.Client, lease.Sticky, lease.lastUsed, lease.hadEntry = c, sticky, lastUsed, hadEntry
	return lease, ""
}

// reserveAttempts bounds how often a decision is taken again after
// another process took a backend's last slot between the pick and the
// reservation; each attempt sees that backend fuller.
const reserveAttempts = 8

// activeOf is the backend's live count the decision uses: over every
// process sharing the backends map (the two of a hand-over), else this
// process's own.
func (b *Balancer) activeOf(st *backendState) int64 {
	if b.Mirror != nil {
		return int64(b.Mirror.ActiveOf(st.index))
	}
	return st.active.Load()
}

// reserve takes a slot on the view's backend i, or returns nil when
// another process sharing the backends map took its last slot since the
// pick. Called with mu held.
func (b *Balancer) reserve(v *tableView, i int) *Lease {
	st := v.states[i]
	if b.Mirror != nil && !b.Mirror.ReserveActive(st.index, uint32(max(v.table.Backends[i].HardLimit, 0))) {
		return nil
	}
	st.active.Add(1)
	st.total.Add(1)
	return &Lease{Backend: v.table.Backends[i], state: st, balancer: b, eligible: b.eff.eligible}
}

// AcquireNext reserves the next best backend for a connection whose dial
// to prev's backend failed (prev.Failed was called): the best eligible
// backend not tried yet for it, ignoring the affinity binding. No backend
// left is RejectAllDialsFailed.
func (b *Balancer) AcquireNext(prev *Lease) (*Lease, routing.RejectReason) {
	prev.state.retries.Add(1)
	tried := append(slices.Clip(prev.tried), prev.Backend.ID)
	b.mu.Lock()
	t := b.routingTable()
	v := b.viewFor(t)
	var lease *Lease
	for range reserveAttempts {
		d := routing.Explain(routing.Input{
			Client:      prev.Client,
			LocalRegion: b.LocalRegion,
			Active:      func(i int) int { return int(b.activeOf(v.states[i])) },
		}, t)
		best := -1
		for i := range d.Candidates {
			c := &d.Candidates[i]
			if c.Excluded != "" || slices.Contains(tried, t.Backends[c.Index].ID) {
				continue
			}
			if best < 0 || betterCandidate(t, c, &d.Candidates[best]) {
				best = i
			}
		}
		if best < 0 {
			break
		}
		if lease = b.reserve(v, d.Candidates[best].Index); lease != nil {
			break
		}
	}
	if lease == nil {
		b.mu.Unlock()
		b.countReject(RejectAllDialsFailed)
		return nil, RejectAllDialsFailed
	}
	b.mu.Unlock()
	lease.Client, lease.tried, lease.hadEntry = prev.Client, tried, prev.hadEntry
	return lease, ""
}

// betterCandidate orders candidates as routing.Pick does: lower score,
// then fewer active connections, then higher weight, then table order.
func betterCandidate(t *routing.Table, a, b *routing.Candidate) bool {
	if a.Score != b.Score {
		return a.Score < b.Score
	}
	if a.Active != b.Active {
		return a.Active < b.Active
	}
	wa, wb := max(t.Backends[a.Index].Weight, 1), max(t.Backends[b.Index].Weight, 1)
	if wa != wb {
		return wa > wb
	}
	return a.Index < b.Index
}

// Rejection reasons decided before or after routing, beside routing's own.
const (
	RejectClientMaxConns routing.RejectReason = "client_max_conns" // the address holds its concurrent cap
	RejectClientRate     routing.RejectReason = "client_rate"      // the address opened connections faster than its rate
	RejectMaxConns       routing.RejectReason = "max_conns"
	RejectProxyProtocol  routing.RejectReason = "proxy_protocol"
	RejectAllDialsFailed routing.RejectReason = "all_dials_failed"
)

// allRejectReasons are shown with zeros from the start.
var allRejectReasons = []routing.RejectReason{
	routing.RejectTableEmpty, routing.RejectNoneHealthy, routing.RejectAllAtHardLimit,
	RejectClientMaxConns, RejectClientRate, RejectMaxConns, RejectProxyProtocol, RejectAllDialsFailed,
}

func (b *Balancer) countReject(reason routing.RejectReason) {
	c, _ := b.rejected.LoadOrStore(reason, new(atomic.Uint64))
	c.(*atomic.Uint64).Add(1)
}

// RejectedCounts returns how many clients were refused, by reason; every
// reason is present so metrics show zeros from the start.
func (b *Balancer) RejectedCounts() map[string]uint64 {
	out := map[string]uint64{}
	for _, r := range allRejectReasons {
		out[string(r)] = 0
	}
	b.rejected.Range(func(k, v any) bool {
		out[string(k.(routing.RejectReason))] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}

// Bindings is the number of client affinity bindings held: counted as they
// are added and swept, and recounted by a sweep that saw no concurrent
// binding (the kernel's LRU evictions show up then).
func (b *Balancer) Bindings() int {
	return int(b.bindings.Load())
}

// Refresh aligns live state with the current routing table and writes it
// to the BPF backends map, so bpftool shows a reload at once. Backends
// gone from the table with no connection left give their slot back.
func (b *Balancer) Refresh() error {
	if b.handedOver.Load() {
		return nil // the successor keeps the shared table now
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.routingTable()
	var errs []error
	// Free first, so a backend added by this table can take a slot that
	// a removed one gave back.
	for id, st := range b.byID {
		if t.Index(id) >= 0 {
			continue
		}
		if b.Mirror != nil {
			b.Mirror.ClearBackend(st.index)
		}
		if b.activeOf(st) > 0 || st.active.Load() > 0 {
			continue // its connections (or a predecessor's) still count into the slot
		}
		if r, ok := b.Mirror.(interface{ ResetBackendBytes(uint32) error }); ok {
			if err := r.ResetBackendBytes(st.index); err != nil {
				errs = append(errs, err)
				continue // never hand out a slot with another backend's bytes
			}
		}
		delete(b.byID, id)
		b.freeSlots = append(b.freeSlots, st.index)
	}
	v := b.viewFor(t)
	if b.Mirror == nil {
		return errors.Join(errs...)
	}
	for i, st := range v.states {
		be := &v.table.Backends[i]
		if err := b.Mirror.SetBackend(st.index, loader.BackendInfo{
			ID: be.ID, Addr: be.Addr, Port: be.Port, Healthy: be.Healthy,
			Weight: uint32(be.Weight), SoftLimit: uint32(be.SoftLimit), HardLimit: uint32(be.HardLimit),
		}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// SweepBindings expires bindings unused for longer than the TTL and drops
// those whose backend is no longer eligible (deleted or unhealthy).
func (b *Balancer) SweepBindings() (removed int, err error) {
	if b.Affinity == nil {
		return 0, nil
	}
	now := b.Now()
	b.mu.Lock()
	t := b.routingTable()
	b.mu.Unlock()
	newBefore := b.newBindings.Load()
	remaining, removed, err := b.Affinity.Sweep(func(id string, lastUsed time.Time) bool {
		i := t.Index(id)
		return now.Sub(lastUsed) <= b.BindingTTL && i >= 0 && t.Backends[i].Healthy
	})
	switch {
	case err != nil:
	case b.newBindings.Load() == newBefore:
		// Nothing bound during the walk: its count is exact, and also
		// catches what the kernel's LRU evicted silently.
		b.bindings.Store(int64(remaining))
	default:
		b.bindings.Add(-int64(removed))
	}
	return removed, err
}

// BackendCounters is a point-in-time copy of one backend's counters.
type BackendCounters struct {
	ID                     string
	Index                  uint32
	Active                 int64
	Total, ConnectErrs     uint64
	BytesIn, BytesOut      uint64
	Retries                uint64
	ChecksOK, ChecksFailed uint64
	Down                   bool // held down by checks or failed dials
	Up                     bool // metrics only: neither checks nor healthy=0 hold it down
	Since                  time.Time
	LastError              string
}

// Counters lists every backend with a slot, in slot order.
func (b *Balancer) Counters() []BackendCounters {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]BackendCounters, 0, len(b.byID))
	for _, st := range b.byID {
		state, since, lastErr := st.health.snapshot(false)
		out = append(out, BackendCounters{
			ID: st.id, Index: st.index, Active: st.active.Load(), Total: st.total.Load(),
			ConnectErrs: st.connectErrs.Load(), BytesIn: st.bytesIn.Load(), BytesOut: st.bytesOut.Load(),
			Retries: st.retries.Load(), ChecksOK: st.health.checksOK.Load(), ChecksFailed: st.health.checksFail.Load(),
			Down: state == StateDown, Since: since, LastError: lastErr,
		})
	}
	slices.SortFunc(out, func(a, b BackendCounters) int { return int(a.Index) - int(b.Index) })
	return out
}

// AffinityStore keeps client -> backend bindings with their last use: the
// pinned BPF map where BPF is usable, memory otherwise.
type AffinityStore interface {
	Lookup(client netip.Addr) (backendID string, lastUsed time.Time, ok bool, err error)
	Bind(client netip.Addr, backendID string, now time.Time) error
	Forget(client netip.Addr) error
	Sweep(keep func(backendID string, lastUsed time.Time) bool) (remaining, removed int, err error)
}

// memoryAffinity is the AffinityStore of hosts without BPF; bindings do
// not survive a restart there.
type memoryAffinity struct {
	mu sync.Mutex
	m  map[netip.Addr]memoryBinding
}

type memoryBinding struct {
	id       string
	lastUsed time.Time
}

func newMemoryAffinity() *memoryAffinity { return &memoryAffinity{m: map[netip.Addr]memoryBinding{}} }

func (a *memoryAffinity) Lookup(client netip.Addr) (string, time.Time, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	b, ok := a.m[client.Unmap()]
	return b.id, b.lastUsed, ok, nil
}

func (a *memoryAffinity) Bind(client netip.Addr, id string, now time.Time) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.m) >= loader.MaxAffinity {
		if _, ok := a.m[client.Unmap()]; !ok {
			return fmt.Errorf("bind %s: %d bindings held, the most this proxy keeps", client, loader.MaxAffinity)
		}
	}
	a.m[client.Unmap()] = memoryBinding{id: id, lastUsed: now}
	return nil
}

func (a *memoryAffinity) Forget(client netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.m, client.Unmap())
	return nil
}

func (a *memoryAffinity) Sweep(keep func(string, time.Time) bool) (remaining, removed int, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, b := range a.m {
		if keep(b.id, b.lastUsed) {
			remaining++
		} else {
			delete(a.m, k)
			removed++
		}
	}
	return remaining, removed, nil
}

// BackendMirror is where the backend table is shown to operators: the BPF
// backends map on Linux with BPF.
type BackendMirror interface {
	SetBackend(index uint32, b loader.BackendInfo) error
	ClearBackend(index uint32)
	// ActiveOf, ReserveActive and ReleaseActive keep the live counts that
	// hard limits act on, shared by both processes of a hand-over.
	ActiveOf(index uint32) uint32
	ReserveActive(index uint32, hardLimit uint32) bool
	ReleaseActive(index uint32)
}

// AdoptSlots takes over the backend slots a predecessor used (from the
// shared backends map), so both processes count a backend into the same
// slot: ids keep their slot, and slots still counting a removed backend's
// connections are never handed out. Call it before the first decision.
func (b *Balancer) AdoptSlots(byID map[string]uint32, busy []uint32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.byID == nil {
		b.byID = map[string]*backendState{}
	}
	used := map[uint32]bool{}
	for _, i := range busy {
		used[i] = true
	}
	for id, i := range byID {
		st := &backendState{id: id, index: i}
		st.health.since = b.Now()
		b.byID[id] = st
		used[i] = true
	}
	b.view = nil
	for i := range used {
		b.nextSlot = max(b.nextSlot, i+1)
	}
	b.freeSlots = b.freeSlots[:0]
	for i := b.nextSlot; i > 0; i-- {
		if !used[i-1] {
			b.freeSlots = append(b.freeSlots, i-1)
		}
	}
}

// ScoreOf recomputes the winning score of a lease for debug logs; it costs
// a full explanation, so callers only ask when debug logging is on.
func (b *Balancer) ScoreOf(l *Lease) float64 {
	b.mu.Lock()
	t := b.routingTable()
	v := b.viewFor(t)
	b.mu.Unlock()
	d := routing.Explain(routing.Input{
		Client:      l.Client,
		LocalRegion: b.LocalRegion,
		Active:      func(i int) int { return int(v.states[i].active.Load()) },
	}, t)
	for _, c := range d.Candidates {
		if t.Backends[c.Index].ID == l.Backend.ID {
			return c.Score
		}
	}
	return -1
}

// addTotals continues a predecessor's counters (a hand-over): each backend
// this process knows adds the totals the old process reported for it.
func (b *Balancer) addTotals(t *handoverTotals) {
	b.mu.Lock()
	for id, bt := range t.Backends {
		st, ok := b.byID[id]
		if !ok {
			continue // gone from the table: its series ends here
		}
		st.total.Add(bt.Total)
		st.connectErrs.Add(bt.ConnectErrs)
		st.bytesIn.Add(bt.BytesIn)
		st.bytesOut.Add(bt.BytesOut)
		st.retries.Add(bt.Retries)
		st.health.checksOK.Add(bt.ChecksOK)
		st.health.checksFail.Add(bt.ChecksFailed)
	}
	b.mu.Unlock()
	for reason, n := range t.Rejected {
		c, _ := b.rejected.LoadOrStore(routing.RejectReason(reason), new(atomic.Uint64))
		c.(*atomic.Uint64).Add(n)
	}
}

// HandedOver stops the balancer writing the backend table it shares with
// a successor (which now keeps it); releases still count down, and each
// is signalled on released from now on.
func (b *Balancer) HandedOver() {
	b.released = make(chan struct{}, 1)
	b.handedOver.Store(true)
}

// releaseShared takes a dead predecessor's connections out of the shared
// live counts: n per backend id, in the slot both processes use. It
// returns how many it took out.
func (b *Balancer) releaseShared(active map[string]int64) int64 {
	if b.Mirror == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var total int64
	for id, n := range active {
		st, ok := b.byID[id]
		if !ok {
			continue
		}
		for range n {
			b.Mirror.ReleaseActive(st.index)
		}
		total += n
	}
	return total
}
