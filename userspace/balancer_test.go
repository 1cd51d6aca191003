package userspace

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/routing"
)

// fixedTables is a TableSource whose table the test replaces.
type fixedTables struct{ t atomic.Pointer[routing.Table] }

func (f *fixedTables) Current() *routing.Table { return f.t.Load() }

func (f *fixedTables) set(tb testing.TB, backends ...routing.Backend) {
	tb.Helper()
	t, err := routing.NewTable(backends, nil, nil)
	if err != nil {
		tb.Fatalf("build table: %v", err)
	}
	f.t.Store(t)
}

// recordingMirror is a BackendMirror that remembers what it was told.
type recordingMirror struct {
	mu      sync.Mutex
	slots   map[uint32]loader.BackendInfo
	active  map[uint32]uint32
	cleared []uint32
	resets  []uint32
}

func newRecordingMirror() *recordingMirror {
	return &recordingMirror{slots: map[uint32]loader.BackendInfo{}, active: map[uint32]uint32{}}
}

func (m *recordingMirror) SetBackend(i uint32, b loader.BackendInfo) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.slots[i] = b
	return nil
}

func (m *recordingMirror) ClearBackend(i uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.slots, i)
	m.cleared = append(m.cleared, i)
}

func (m *recordingMirror) ActiveOf(i uint32) uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.active[i]
}

func (m *recordingMirror) ReserveActive(i, hard uint32) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if hard > 0 && m.active[i] >= hard {
		return false
	}
	m.active[i]++
	return true
}

func (m *recordingMirror) ReleaseActive(i uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.active[i] > 0 {
		m.active[i]--
	}
}

func (m *recordingMirror) ResetBackendBytes(i uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.resets = append(m.resets, i)
	return nil
}

func backend(id, country string, port uint16) routing.Backend {
	return routing.Backend{ID: id, Region: "sa", Country: country, Addr: netip.MustParseAddr("10.0.0.1"),
		Port: port, Healthy: true, Weight: 1, SoftLimit: 10}
}

func newTestBalancer(t *testing.T, backends ...routing.Backend) (*Balancer, *fixedTables, *recordingMirror, *fakeClock) {
	t.Helper()
	tables := &fixedTables{}
	tables.set(t, backends...)
	mirror := newRecordingMirror()
	clock := newFakeClock()
	b := &Balancer{
		Store: tables, LocalRegion: "sa", Now: clock.Now, BindingTTL: time.Minute,
		Affinity: newMemoryAffinity(), Mirror: mirror,
		Health: HealthConfig{Fall: 2, Rise: 2},
	}
	return b, tables, mirror, clock
}

var client = netip.MustParseAddr("192.0.2.10")

func mustAcquire(t *testing.T, b *Balancer) *Lease {
	t.Helper()
	l, reason := b.Acquire(client)
	if l == nil {
		t.Fatalf("acquire refused: %s", reason)
	}
	return l
}

func TestHealthStateTransitions(t *testing.T) {
	type step struct {
		ok       bool
		wantDown bool
		flipped  bool
	}
	cases := []struct {
		name       string
		fall, rise int
		steps      []step
	}{
		{"one failure below fall keeps it up", 3, 2, []step{{false, false, false}, {false, false, false}}},
		{"fall failures in a row mark it down", 3, 2, []step{{false, false, false}, {false, false, false}, {false, true, true}}},
		{"a success clears the failure run", 2, 2, []step{{false, false, false}, {true, false, false}, {false, false, false}, {false, true, true}}},
		{"rise successes mark it up again", 1, 2, []step{{false, true, true}, {true, true, false}, {true, false, true}}},
		{"a failure while down clears the success run", 1, 2, []step{{false, true, true}, {true, true, false}, {false, true, false}, {true, true, false}, {true, false, true}}},
		{"fall and rise of one flip at once", 1, 1, []step{{false, true, true}, {true, false, true}, {false, true, true}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h health
			at := time.Unix(1000, 0)
			for i, s := range tc.steps {
				ev := healthEvent{ok: s.ok, at: at.Add(time.Duration(i) * time.Second)}
				if !s.ok {
					ev.err = "connection refused"
				}
				flipped := h.step(ev, tc.fall, tc.rise)
				if flipped != s.flipped || h.isDown() != s.wantDown {
					t.Fatalf("step %d (ok=%v): flipped=%v down=%v, want flipped=%v down=%v", i, s.ok, flipped, h.isDown(), s.flipped, s.wantDown)
				}
				if flipped {
					if _, since, _ := h.snapshot(false); !since.Equal(ev.at) {
						t.Fatalf("step %d: state since %v, want %v", i, since, ev.at)
					}
				}
			}
		})
	}
}

func TestHealthSnapshotAdminDownWins(t *testing.T) {
	var h health
	if st, _, _ := h.snapshot(true); st != StateAdminDown {
		t.Fatalf("healthy=0 with checks passing shows %s, want admin_down", st)
	}
	h.step(healthEvent{ok: false, err: "refused", at: time.Unix(1, 0)}, 1, 1)
	if st, _, lastErr := h.snapshot(false); st != StateDown || lastErr != "refused" {
		t.Fatalf("after a failure with fall 1: %s %q, want down with the error", st, lastErr)
	}
}

func TestBackendDownByChecksIsNotPicked(t *testing.T) {
	b, _, mirror, _ := newTestBalancer(t, backend("a-best", "BR", 1), backend("b-next", "BR", 2))
	b.Refresh()
	st := b.stateByID("a-best")
	for range 2 {
		b.observe(st, errors.New("connection refused"))
	}
	l := mustAcquire(t, b)
	if l.Backend.ID != "b-next" {
		t.Fatalf("picked %s, want b-next while a-best is down", l.Backend.ID)
	}
	if b.Panicking() {
		t.Fatal("panic routing on while a backend is up")
	}
	if info := mirror.slots[st.index]; info.Healthy {
		t.Fatal("the BPF mirror still shows a-best healthy after checks marked it down")
	}
	// Rise successes bring it back.
	for range 2 {
		b.observe(st, nil)
	}
	l.Release()
	if l := mustAcquire(t, b); l.Backend.ID != "a-best" {
		t.Fatalf("picked %s after a-best rose, want a-best", l.Backend.ID)
	}
}

func TestPanicRoutingWhenChecksHoldEveryBackendDown(t *testing.T) {
	admin := backend("c-admin-down", "BR", 3)
	admin.Healthy = false
	b, _, _, _ := newTestBalancer(t, backend("a", "BR", 1), backend("b", "BR", 2), admin)
	b.Refresh()
	for _, id := range []string{"a", "b"} {
		st := b.stateByID(id)
		for range 2 {
			b.observe(st, errors.New("refused"))
		}
	}
	if !b.Panicking() {
		t.Fatal("every backend down by checks, but panic routing is off")
	}
	seen := map[string]bool{}
	for range 4 {
		l := mustAcquire(t, b)
		seen[l.Backend.ID] = true
	}
	if seen["c-admin-down"] {
		t.Fatal("panic routing picked a backend that routing.db holds down (healthy=0)")
	}
	if !seen["a"] || !seen["b"] {
		t.Fatalf("panic routing should spread over every checked-down backend, saw %v", seen)
	}
	b.observe(b.stateByID("a"), nil)
	b.observe(b.stateByID("a"), nil)
	if b.Panicking() {
		t.Fatal("panic routing still on after a backend rose")
	}
}

func TestRetryPicksNextBestUntriedBackend(t *testing.T) {
	b, _, _, _ := newTestBalancer(t, backend("a", "BR", 1), backend("b", "AR", 2), backend("c", "US", 3))
	l := mustAcquire(t, b)
	if l.Backend.ID != "a" {
		t.Fatalf("first pick %s, want a (same country)", l.Backend.ID)
	}
	var order []string
	for {
		order = append(order, l.Backend.ID)
		l.Failed(errors.New("refused"))
		next, reason := b.AcquireNext(l)
		if next == nil {
			if reason != RejectAllDialsFailed {
				t.Fatalf("no backend left: reason %s, want all_dials_failed", reason)
			}
			break
		}
		l = next
	}
	if want := []string{"a", "b", "c"}; len(order) != 3 || order[0] != want[0] || order[1] != want[1] || order[2] != want[2] {
		t.Fatalf("tried %v, want %v", order, want)
	}
	if got := b.RejectedCounts()[string(RejectAllDialsFailed)]; got != 1 {
		t.Fatalf("all_dials_failed = %d, want 1", got)
	}
	for _, c := range b.Counters() {
		if c.Active != 0 || c.ConnectErrs != 1 || c.Retries != 1 {
			t.Fatalf("%s: active %d, connect errors %d, retries %d; want 0, 1, 1", c.ID, c.Active, c.ConnectErrs, c.Retries)
		}
	}
}

func TestBindingMovesToTheBackendThatAnswered(t *testing.T) {
	b, _, _, clock := newTestBalancer(t, backend("a", "BR", 1), backend("b", "BR", 2))
	l := mustAcquire(t, b)
	if _, _, ok, _ := b.Affinity.Lookup(client); ok {
		t.Fatal("a binding was written before any backend answered")
	}
	l.Connected()
	l.Release()
	if id, _, _, _ := b.Affinity.Lookup(client); id != l.Backend.ID {
		t.Fatalf("bound to %q, want %q", id, l.Backend.ID)
	}
	first := l.Backend.ID
	clock.Advance(5 * time.Second)
	sticky := mustAcquire(t, b)
	if !sticky.Sticky || sticky.Backend.ID != first {
		t.Fatalf("second connection went to %s (sticky=%v), want the bound %s", sticky.Backend.ID, sticky.Sticky, first)
	}
	sticky.Failed(errors.New("refused"))
	next, _ := b.AcquireNext(sticky)
	if next == nil || next.Backend.ID == first {
		t.Fatalf("retry after the bound backend failed went to %v", next)
	}
	next.Connected()
	if id, _, _, _ := b.Affinity.Lookup(client); id != next.Backend.ID {
		t.Fatalf("binding stayed on %q after %q answered", id, next.Backend.ID)
	}
	if b.Bindings() != 1 {
		t.Fatalf("bindings = %d, want 1 (moving a binding adds none)", b.Bindings())
	}
}

func TestBackendSlotsAreReusedOnceGoneAndIdle(t *testing.T) {
	b, tables, mirror, _ := newTestBalancer(t, backend("a", "BR", 1), backend("b", "BR", 2))
	b.Refresh()
	held := mustAcquire(t, b)
	gone := held.Backend.ID
	slot := b.stateByID(gone).index
	var kept routing.Backend
	if gone == "a" {
		kept = backend("b", "BR", 2)
	} else {
		kept = backend("a", "BR", 1)
	}
	tables.set(t, kept)
	b.Refresh()
	if b.stateByID(gone) == nil {
		t.Fatal("a removed backend with a live connection lost its state")
	}
	held.Release()
	tables.set(t, kept, backend("c-new", "BR", 3))
	b.Refresh()
	st := b.stateByID("c-new")
	if st == nil || st.index != slot {
		t.Fatalf("new backend got slot %v, want the freed slot %d", st, slot)
	}
	if len(mirror.resets) != 1 || mirror.resets[0] != slot {
		t.Fatalf("byte counters reset for slots %v, want [%d]", mirror.resets, slot)
	}
	if got := mirror.slots[slot].ID; got != "c-new" {
		t.Fatalf("mirror slot %d shows %q, want c-new", slot, got)
	}
}

func TestHealthChecksSpreadAndBounded(t *testing.T) {
	var backends []routing.Backend
	for i := range 12 {
		backends = append(backends, backend(string(rune('a'+i)), "BR", uint16(100+i)))
	}
	down := backend("zz-down", "BR", 9)
	backends = append(backends, down)
	b, _, _, _ := newTestBalancer(t, backends...)
	b.Now = time.Now
	b.Refresh()
	var inFlight, most atomic.Int32
	var probes atomic.Int32
	probe := func(ctx context.Context, addr string) error {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		probes.Add(1)
		time.Sleep(30 * time.Millisecond)
		if addr == down.AddrPort().String() {
			return errors.New("connection refused")
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cfg := HealthConfig{Interval: 200 * time.Millisecond, Timeout: 100 * time.Millisecond, Fall: 2, Rise: 2, Workers: 2}
	done := make(chan struct{})
	go func() { b.runHealthChecks(ctx, cfg, probe); close(done) }()
	deadline := time.Now().Add(2 * time.Second)
	for !b.stateByID("zz-down").health.isDown() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if !b.stateByID("zz-down").health.isDown() {
		t.Fatal("a refusing backend was not marked down within 2 s at a 200 ms interval and fall 2")
	}
	if m := most.Load(); m > 2 {
		t.Fatalf("%d probes ran at once, the bound is 2", m)
	}
	for _, c := range b.Counters() {
		if c.ID != "zz-down" && c.Down {
			t.Fatalf("%s marked down though every probe passed", c.ID)
		}
	}
	t.Logf("%d probes, at most %d at once", probes.Load(), most.Load())
}

func TestHealthChecksSpreadOverTheInterval(t *testing.T) {
	var backends []routing.Backend
	for i := range 13 {
		backends = append(backends, backend(fmt.Sprintf("backend-%02d", i), "BR", uint16(100+i)))
	}
	b, _, _, _ := newTestBalancer(t, backends...)
	b.Now = time.Now
	var mu sync.Mutex
	var starts []time.Time
	probe := func(context.Context, string) error {
		mu.Lock()
		starts = append(starts, time.Now())
		mu.Unlock()
		return nil
	}
	interval := 400 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), interval-20*time.Millisecond)
	defer cancel()
	b.runHealthChecks(ctx, HealthConfig{Interval: interval, Timeout: 50 * time.Millisecond, Fall: 1, Rise: 1, Workers: 16}, probe)
	mu.Lock()
	defer mu.Unlock()
	if len(starts) < 8 {
		t.Fatalf("only %d of 13 backends probed in the first round", len(starts))
	}
	span := starts[len(starts)-1].Sub(starts[0])
	// Fired together they would start within a millisecond; offsets from
	// hashed ids spread 13 of them over most of the interval.
	if span < interval/4 {
		t.Fatalf("%d probes started within %v of each other, want them spread over the %v interval", len(starts), span, interval)
	}
	t.Logf("first round: %d probes spread over %v of a %v interval", len(starts), span, interval)
}

func TestAdmissionCapsConnections(t *testing.T) {
	b, _, _, _ := newTestBalancer(t, backend("a", "BR", 1))
	a := &admission{maxConns: 2, balancer: b}
	r1, _ := a.admit(client)
	r2, _ := a.admit(client)
	if r1 == nil || r2 == nil {
		t.Fatal("refused below the cap")
	}
	if r3, reason := a.admit(client); r3 != nil || reason != RejectMaxConns {
		t.Fatalf("third admit: release=%v reason=%q, want a max_conns refusal", r3 != nil, reason)
	}
	r1()
	r1() // twice gives back one slot
	if r, _ := a.admit(client); r == nil {
		t.Fatal("refused after a slot was given back")
	}
	if _, reason := a.admit(client); reason != RejectMaxConns {
		t.Fatal("releasing twice gave back two slots")
	}
	if got := b.RejectedCounts()[string(RejectMaxConns)]; got != 2 {
		t.Fatalf("max_conns refusals = %d, want 2", got)
	}
}

// blockedWriter blocks every write until released, like a full pipe.
type blockedWriter struct {
	release chan struct{}
	mu      sync.Mutex
	got     []string
}

func (w *blockedWriter) Write(p []byte) (int, error) {
	<-w.release
	w.mu.Lock()
	defer w.mu.Unlock()
	w.got = append(w.got, string(p))
	return len(p), nil
}

func TestAsyncWriterNeverBlocks(t *testing.T) {
	out := &blockedWriter{release: make(chan struct{})}
	w := NewAsyncWriter(out, 4)
	done := make(chan struct{})
	go func() {
		for range 100 {
			w.Write([]byte("line\n"))
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("writes blocked behind a stalled reader")
	}
	close(out.release)
	w.Close()
	dropped := false
	for _, l := range out.got {
		if l != "line\n" {
			dropped = true
		}
	}
	if !dropped || len(out.got) >= 100 {
		t.Fatalf("wrote %d lines, want fewer than 100 plus a dropped-lines note", len(out.got))
	}
}

func TestLocalExhaustionIsNotABackendFault(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"out of descriptors", fmt.Errorf("create backend socket: %w", syscall.EMFILE), true},
		{"system file table full", &os.SyscallError{Syscall: "socket", Err: syscall.ENFILE}, true},
		{"refused", fmt.Errorf("connect: %w", syscall.ECONNREFUSED), false},
		{"timeout", context.DeadlineExceeded, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := localExhaustion(tc.err); got != tc.want {
				t.Fatalf("localExhaustion(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

func TestSelfCheckFindsTheProxysOwnListener(t *testing.T) {
	cases := []struct {
		name, listen, backend string
		want                  bool
	}{
		{"loopback on the port of a wildcard listener", "0.0.0.0:8080", "127.0.0.1:8080", true},
		{"IPv6 loopback on the port of a wildcard listener", "[::]:8080", "[::1]:8080", true},
		{"another port", "0.0.0.0:8080", "127.0.0.1:8081", false},
		{"the bound address itself", "10.1.2.3:443", "10.1.2.3:443", true},
		{"another address of a bound listener", "10.1.2.3:443", "127.0.0.1:443", false},
		{"a remote backend on the same port", "0.0.0.0:8080", "198.51.100.7:8080", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			self := SelfCheck(tc.listen)
			if got := self(netip.MustParseAddrPort(tc.backend)); got != tc.want {
				t.Fatalf("SelfCheck(%s)(%s) = %v, want %v", tc.listen, tc.backend, got, tc.want)
			}
		})
	}
}

func TestConnectBudgetSplitsOverBackendsThatCanBeTried(t *testing.T) {
	lone, _, _, _ := newTestBalancer(t, backend("only", "BR", 1))
	if got := mustAcquire(t, lone).AttemptsLeft(2); got != 1 {
		t.Fatalf("a lone backend: %d attempts left, want 1 (it gets the whole connect budget)", got)
	}
	b, _, _, _ := newTestBalancer(t, backend("a", "BR", 1), backend("b", "BR", 2), backend("c", "BR", 3), backend("d", "BR", 4))
	l := mustAcquire(t, b)
	if got := l.AttemptsLeft(2); got != 3 {
		t.Fatalf("4 backends, 2 retries: %d attempts left, want 3", got)
	}
	l.Failed(errors.New("refused"))
	next, _ := b.AcquireNext(l)
	if got := next.AttemptsLeft(2); got != 2 {
		t.Fatalf("after one failure: %d attempts left, want 2", got)
	}
	if got := next.AttemptsLeft(0); got != 1 {
		t.Fatalf("no retries: %d attempts left, want 1", got)
	}
}

// Two processes of a hand-over share the backends map: a hard limit holds
// over the connections of both, and a slot freed in one is usable in the
// other.
func TestHardLimitSharedByTwoProcesses(t *testing.T) {
	limited := backend("b1", "BR", 9000)
	limited.HardLimit = 3
	old, _, shared, _ := newTestBalancer(t, limited)
	if err := old.Refresh(); err != nil {
		t.Fatal(err)
	}
	var held []*Lease
	for range 2 {
		held = append(held, mustAcquire(t, old))
	}
	slots, busy := map[string]uint32{"b1": held[0].state.index}, []uint32(nil)
	successor, _, _, _ := newTestBalancer(t, limited)
	successor.Mirror = shared
	successor.AdoptSlots(slots, busy)
	if err := successor.Refresh(); err != nil {
		t.Fatal(err)
	}
	if got := successor.byID["b1"].index; got != held[0].state.index {
		t.Fatalf("successor put b1 in slot %d, the old process counts it in slot %d", got, held[0].state.index)
	}
	third := mustAcquire(t, successor)
	if l, reason := successor.Acquire(client); l != nil || reason != routing.RejectAllAtHardLimit {
		t.Fatalf("fourth connection over both processes: lease %v reason %q, want refused all_at_hard_limit", l != nil, reason)
	}
	if l, _ := old.Acquire(client); l != nil {
		t.Fatal("the old process admitted a fourth connection over both processes")
	}
	held[0].Release()
	fourth := mustAcquire(t, successor)
	if n := shared.ActiveOf(third.state.index); n != 3 {
		t.Fatalf("shared live count %d, want 3", n)
	}
	for _, l := range []*Lease{held[1], third, fourth} {
		l.Release()
	}
	if n := shared.ActiveOf(third.state.index); n != 0 {
		t.Fatalf("shared live count %d after every release, want 0", n)
	}
}

// racingMirror plays the other process of a hand-over taking a slot on
// raceOn between this process's pick and its reservation, once.
type racingMirror struct {
	*recordingMirror
	raceOn uint32
	raced  bool
}

func (m *racingMirror) ReserveActive(i, hard uint32) bool {
	if i == m.raceOn && !m.raced {
		m.raced = true
		m.recordingMirror.ReserveActive(i, hard)
	}
	return m.recordingMirror.ReserveActive(i, hard)
}

// A reservation that loses the race for a backend's last slot to the
// other process decides again instead of overshooting.
func TestReserveLostRaceDecidesAgain(t *testing.T) {
	full := backend("full", "BR", 9000)
	full.HardLimit = 1
	spare := backend("spare", "BR", 9001)
	b, _, shared, _ := newTestBalancer(t, full, spare)
	if err := b.Refresh(); err != nil {
		t.Fatal(err)
	}
	racing := &racingMirror{recordingMirror: shared, raceOn: b.byID["full"].index}
	b.Mirror = racing
	l := mustAcquire(t, b)
	if !racing.raced {
		t.Fatal("the pick never tried full: the test does not race")
	}
	if l.Backend.ID != "spare" {
		t.Fatalf("picked %s, whose only slot the other process took", l.Backend.ID)
	}
	if n := shared.ActiveOf(b.byID["full"].index); n != 1 {
		t.Fatalf("full counts %d connections, want the other process's 1", n)
	}
}
