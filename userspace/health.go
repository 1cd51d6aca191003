package userspace

import (
	"context"
	"hash/fnv"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// HealthConfig is the active check of every backend: a TCP connect each
// Interval, down after Fall failures in a row, up after Rise successes.
type HealthConfig struct {
	Interval time.Duration // 0: no active checks (failed dials still count)
	Timeout  time.Duration
	Fall     int
	Rise     int
	// Workers bounds the probes in flight at once, so a table of
	// thousands of backends never opens thousands of sockets together.
	Workers int
}

// HealthState is what /status shows of a backend.
type HealthState string

const (
	StateUp        HealthState = "up"
	StateDown      HealthState = "down"       // held down by checks or failed dials
	StateAdminDown HealthState = "admin_down" // healthy=0 in routing.db: always wins
)

// healthEvent is one observation of a backend: an active probe or a dial
// of the data plane.
type healthEvent struct {
	ok  bool
	err string
	at  time.Time
}

// health is one backend's check state. step is the only place it changes,
// so the state machine reads in one function:
//
//	up   --fail x Fall--> down
//	down --ok x Rise----> up
//
// A success while up clears the failure run; a failure while down clears
// the success run.
type health struct {
	mu      sync.Mutex
	down    bool
	fails   int // consecutive failures while up
	oks     int // consecutive successes while down
	since   time.Time
	lastErr string

	// suspect is set while a failure run is open or the backend is down,
	// so the data plane's successful dials skip the mutex otherwise.
	suspect    atomic.Bool
	checksOK   atomic.Uint64
	checksFail atomic.Uint64
}

// step applies one event and reports whether up/down flipped.
func (h *health) step(ev healthEvent, fall, rise int) (changed bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.since.IsZero() {
		h.since = ev.at
	}
	if !ev.ok {
		h.lastErr = ev.err
	}
	switch {
	case !h.down && ev.ok:
		h.fails = 0
	case !h.down:
		h.fails++
		if h.fails >= max(fall, 1) {
			h.down, h.oks, h.since, changed = true, 0, ev.at, true
		}
	case ev.ok:
		h.oks++
		if h.oks >= max(rise, 1) {
			h.down, h.fails, h.since, changed = false, 0, ev.at, true
		}
	default:
		h.oks = 0
	}
	h.suspect.Store(h.down || h.fails > 0)
	return changed
}

// snapshot is the state as /status shows it; adminDown wins over checks.
func (h *health) snapshot(adminDown bool) (state HealthState, since time.Time, lastErr string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	state = StateUp
	if h.down {
		state = StateDown
	}
	if adminDown {
		state = StateAdminDown
	}
	return state, h.since, h.lastErr
}

func (h *health) isDown() bool {
	if !h.suspect.Load() {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.down
}

// probeFunc checks one address; a seam for tests.
type probeFunc func(ctx context.Context, addr string) error

// tcpProbe connects and resets at once: the backend sees a connection
// that ends without a byte, and this host keeps no TIME_WAIT per check.
func tcpProbe(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	return c.Close()
}

// runHealthChecks probes every backend that routing.db does not hold down
// until ctx ends. Each backend keeps a fixed offset in the interval, taken
// from its id, so checks are spread over the interval rather than fired
// together, and a reload does not move them all at once.
func (b *Balancer) runHealthChecks(ctx context.Context, cfg HealthConfig, probe probeFunc) {
	if cfg.Interval <= 0 {
		return
	}
	workers := make(chan struct{}, max(cfg.Workers, 1))
	var wg sync.WaitGroup
	defer wg.Wait()
	round := time.Now()
	for ctx.Err() == nil {
		t := b.Store.Current()
		type due struct {
			at   time.Time
			id   string
			addr string
		}
		var plan []due
		for i := range t.Backends {
			be := &t.Backends[i]
			if !be.Healthy {
				continue
			}
			offset := time.Duration(spreadOf(be.ID) % uint64(cfg.Interval))
			plan = append(plan, due{at: round.Add(offset), id: be.ID, addr: be.AddrPort().String()})
		}
		slices.SortFunc(plan, func(a, b due) int { return a.at.Compare(b.at) })
		for _, d := range plan {
			if !sleepUntil(ctx, d.at) {
				return
			}
			select {
			case workers <- struct{}{}:
			case <-ctx.Done():
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-workers }()
				pctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				err := probe(pctx, d.addr)
				cancel()
				if ctx.Err() != nil {
					return // stopping: a cancelled probe says nothing
				}
				b.observeProbe(d.id, err)
			}()
		}
		round = round.Add(cfg.Interval)
		if now := time.Now(); round.Before(now) {
			round = now // a slow round does not make the next one burst
		}
		if !sleepUntil(ctx, round) {
			return
		}
	}
}

func spreadOf(id string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	return h.Sum64()
}

func sleepUntil(ctx context.Context, at time.Time) bool {
	d := time.Until(at)
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// observeProbe records an active check's outcome.
func (b *Balancer) observeProbe(id string, err error) {
	st := b.stateByID(id)
	if st == nil {
		return // gone from the table meanwhile
	}
	if err != nil {
		st.health.checksFail.Add(1)
	} else {
		st.health.checksOK.Add(1)
	}
	b.observe(st, err)
}

// observe feeds one outcome into a backend's state machine and, when it
// flips, republishes the table routing decides on.
func (b *Balancer) observe(st *backendState, err error) {
	if err == nil && !st.health.suspect.Load() {
		return // the common case of the data plane: nothing to record
	}
	ev := healthEvent{ok: err == nil, at: b.Now()}
	if err != nil {
		ev.err = err.Error()
	}
	if !st.health.step(ev, b.Health.Fall, b.Health.Rise) {
		return
	}
	state := "up"
	if st.health.isDown() {
		state = "down"
	}
	if b.Log != nil {
		b.Log.Warn("backend "+state, "backend", st.id, "last_error", ev.err)
	}
	b.healthGen.Add(1)
	if rerr := b.Refresh(); rerr != nil && b.Log != nil {
		b.Log.Warn("cannot mirror the backend table into BPF", "err", rerr)
	}
}

func (b *Balancer) stateByID(id string) *backendState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.byID[id]
}
