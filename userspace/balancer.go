package userspace

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

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
	Sticky   bool
	state    *backendState
	released atomic.Bool
}

// Release frees the lease's slot. Safe to call more than once.
func (l *Lease) Release() {
	if l.released.CompareAndSwap(false, true) {
		l.state.active.Add(-1)
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

// Acquire decides where the client goes and reserves a slot there.
func (b *Balancer) Acquire(client netip.Addr) (*Lease, routing.RejectReason) {
	c := b.Client(client)
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.Store.Current()
	v := b.viewFor(t)
	in := routing.Input{
		Client:      c,
		LocalRegion: b.LocalRegion,
		Active:      func(i int) int { return int(v.states[i].active.Load()) },
	}
	winner, sticky, reject := routing.Pick(in, t)
	if winner < 0 {
		b.countReject(reject)
		return nil, reject
	}
	st := v.states[winner]
	st.active.Add(1)
	st.total.Add(1)
	return &Lease{Backend: t.Backends[winner], Sticky: sticky, state: st}, ""
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

// Bindings is the number of client affinity bindings held.
func (b *Balancer) Bindings() int {
	if b.Affinity == nil {
		return 0
	}
	return b.Affinity.Len()
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

// AffinityStore keeps client -> backend bindings with their last use.
type AffinityStore interface {
	Lookup(client netip.Addr, now time.Time) (backendID string, ok bool)
	Bind(client netip.Addr, backendID string, now time.Time) error
	Forget(client netip.Addr) error
	Len() int
}
