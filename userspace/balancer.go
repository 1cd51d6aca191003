package userspace

import (
	"errors"
	"fmt"
	"net/netip"
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
}

// Release frees the lease's slot. Safe to call more than once.
func (l *Lease) Release() {
	if l.released.CompareAndSwap(false, true) {
		active := l.state.active.Add(-1)
		if l.balancer != nil && l.balancer.Mirror != nil {
			l.balancer.Mirror.StoreActive(l.state.index, uint32(max(active, 0)))
		}
	}
}

// Balancer turns a client address into a backend lease using the current
// routing snapshot and live connection counts.
type Balancer struct {
	Store       *routing.Store
	Geo         *routing.GeoSource // nil: clients have no country
	LocalRegion string
	Now         func() time.Time
	Affinity    AffinityStore // nil: no affinity
	BindingTTL  time.Duration
	Mirror      BackendMirror // nil: no BPF backends map

	bindings       atomic.Int64 // bindings held: counted at each sweep, plus new ones since
	newBindings    atomic.Int64 // entries ever added: a sweep whose walk saw none added is exact
	affinityErrors atomic.Uint64

	mu       sync.Mutex // serializes decide+reserve so hard limits hold
	byID     map[string]*backendState
	view     *tableView
	rejected sync.Map // routing.RejectReason -> *atomic.Uint64
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
			st = &backendState{id: id, index: uint32(len(b.byID))}
			b.byID[id] = st
		}
		v.states[i] = st
	}
	b.view = v
	return v
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
	t := b.Store.Current()
	v := b.viewFor(t)
	in := routing.Input{
		Client:      c,
		LocalRegion: b.LocalRegion,
		Active:      func(i int) int { return int(v.states[i].active.Load()) },
		BoundID:     bound,
	}
	winner, sticky, reject := routing.Pick(&in, t)
	if winner < 0 {
		b.mu.Unlock()
		b.countReject(reject)
		return nil, reject
	}
	st := v.states[winner]
	active := st.active.Add(1)
	st.total.Add(1)
	b.mu.Unlock()
	if b.Mirror != nil {
		b.Mirror.StoreActive(st.index, uint32(active))
	}
	lease := &Lease{Backend: t.Backends[winner], Client: c, Sticky: sticky, state: st, balancer: b}
	// Refreshing costs a map write; a binding used within the last second
	// is fresh enough for any TTL measured in seconds.
	if b.Affinity != nil && (!sticky || now.Sub(lastUsed) > time.Second) {
		if err := b.Affinity.Bind(client, lease.Backend.ID, now); err != nil {
			b.affinityErrors.Add(1)
		} else if !hadEntry {
			b.bindings.Add(1)
			b.newBindings.Add(1)
		}
	}
	return lease, ""
}

func (b *Balancer) countReject(reason routing.RejectReason) {
	c, _ := b.rejected.LoadOrStore(reason, new(atomic.Uint64))
	c.(*atomic.Uint64).Add(1)
}

// RejectedCounts returns how many clients were refused, by reason; every
// reason is present so metrics show zeros from the start.
func (b *Balancer) RejectedCounts() map[string]uint64 {
	out := map[string]uint64{}
	for _, r := range []routing.RejectReason{routing.RejectTableEmpty, routing.RejectNoneHealthy, routing.RejectAllAtHardLimit} {
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
// to the BPF backends map, so bpftool shows a reload at once.
func (b *Balancer) Refresh() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	v := b.viewFor(b.Store.Current())
	if b.Mirror == nil {
		return nil
	}
	present := make(map[uint32]bool, len(v.states))
	var errs []error
	for i, st := range v.states {
		be := &v.table.Backends[i]
		present[st.index] = true
		if err := b.Mirror.SetBackend(st.index, loader.BackendInfo{
			ID: be.ID, Addr: be.Addr, Port: be.Port, Healthy: be.Healthy,
			Weight: uint32(be.Weight), SoftLimit: uint32(be.SoftLimit), HardLimit: uint32(be.HardLimit),
		}); err != nil {
			errs = append(errs, err)
		}
		b.Mirror.StoreActive(st.index, uint32(max(st.active.Load(), 0)))
	}
	for _, st := range b.byID {
		if !present[st.index] {
			b.Mirror.ClearBackend(st.index)
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
	t := b.Store.Current()
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
	ID                 string
	Index              uint32
	Active             int64
	Total, ConnectErrs uint64
	BytesIn, BytesOut  uint64
}

// Counters lists every backend ever seen, in first-seen order.
func (b *Balancer) Counters() []BackendCounters {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]BackendCounters, len(b.byID))
	for _, st := range b.byID {
		out[st.index] = BackendCounters{
			ID: st.id, Index: st.index, Active: st.active.Load(), Total: st.total.Load(),
			ConnectErrs: st.connectErrs.Load(), BytesIn: st.bytesIn.Load(), BytesOut: st.bytesOut.Load(),
		}
	}
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
	StoreActive(index uint32, active uint32)
}

// ScoreOf recomputes the winning score of a lease for debug logs; it costs
// a full explanation, so callers only ask when debug logging is on.
func (b *Balancer) ScoreOf(l *Lease) float64 {
	t := b.Store.Current()
	b.mu.Lock()
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
