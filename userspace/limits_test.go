package userspace

import (
	"math"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a settable clock for the rate buckets.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// addrN is a distinct IPv4 address for each n.
func addrN(n int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)})
}

// step is one action against a limiter: admit an address (and expect a
// reason, "" for admitted), release the i-th admission, or move the clock.
type step struct {
	admit   string
	want    string
	release int // index into the admissions so far, 1-based; 0: none
	advance time.Duration
}

func TestClientLimiterAdmits(t *testing.T) {
	const a, b = "192.0.2.1", "192.0.2.2"
	for _, tc := range []struct {
		name      string
		maxConns  int
		perSecond float64
		steps     []step
	}{
		{
			name: "both limits off admits everything",
			steps: []step{
				{admit: a}, {admit: a}, {admit: a}, {admit: a},
			},
		},
		{
			name:      "an infinite rate is no rate limit",
			perSecond: math.Inf(1),
			steps: []step{
				{admit: a}, {admit: a}, {admit: a}, {admit: a},
			},
		},
		{
			name:     "the cap refuses the connection past it and not another address",
			maxConns: 2,
			steps: []step{
				{admit: a}, {admit: a}, {admit: a, want: string(RejectClientMaxConns)}, {admit: b},
			},
		},
		{
			name:     "a released slot can be taken again",
			maxConns: 1,
			steps: []step{
				{admit: a}, {admit: a, want: string(RejectClientMaxConns)}, {release: 1}, {admit: a},
			},
		},
		{
			name:     "releasing twice gives back one slot",
			maxConns: 2,
			steps: []step{
				{admit: a}, {admit: a}, {release: 1}, {release: 1},
				{admit: a}, {admit: a, want: string(RejectClientMaxConns)},
			},
		},
		{
			name:     "an IPv4-mapped address is the same client as its IPv4 form",
			maxConns: 1,
			steps: []step{
				{admit: a}, {admit: "::ffff:" + a, want: string(RejectClientMaxConns)},
			},
		},
		{
			name:      "the rate refuses past the burst and not another address",
			perSecond: 3,
			steps: []step{
				{admit: a}, {admit: a}, {admit: a}, {admit: a, want: string(RejectClientRate)}, {admit: b},
			},
		},
		{
			name:      "the rate refills with the clock",
			perSecond: 2,
			steps: []step{
				{admit: a}, {admit: a}, {admit: a, want: string(RejectClientRate)},
				{advance: 499 * time.Millisecond}, {admit: a, want: string(RejectClientRate)},
				{advance: time.Millisecond}, {admit: a}, {admit: a, want: string(RejectClientRate)},
				{advance: time.Hour}, {admit: a}, {admit: a}, {admit: a, want: string(RejectClientRate)},
			},
		},
		{
			name:      "a fractional rate has a burst of its ceiling",
			perSecond: 1.5,
			steps: []step{
				{admit: a}, {admit: a}, {admit: a, want: string(RejectClientRate)},
			},
		},
		{
			name:      "a rate below one per second has a burst of one",
			perSecond: 0.1,
			steps: []step{
				{admit: a}, {admit: a, want: string(RejectClientRate)},
				{advance: 9 * time.Second}, {admit: a, want: string(RejectClientRate)},
				{advance: time.Second}, {admit: a},
			},
		},
		{
			name:      "a connection refused by the cap spends no rate token",
			maxConns:  1,
			perSecond: 2,
			steps: []step{
				{admit: a}, {admit: a, want: string(RejectClientMaxConns)}, {admit: a, want: string(RejectClientMaxConns)},
				{release: 1}, {admit: a}, // the second token is still there
			},
		},
		{
			name:      "a connection refused by the rate holds no slot",
			maxConns:  2,
			perSecond: 1,
			steps: []step{
				{admit: a}, {admit: a, want: string(RejectClientRate)}, {admit: a, want: string(RejectClientRate)},
				{advance: time.Second}, {admit: a}, // a second slot was free all along
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			l := NewClientLimiter(tc.maxConns, tc.perSecond, 16, clock.Now)
			var releases []func()
			for i, s := range tc.steps {
				switch {
				case s.advance != 0:
					clock.Advance(s.advance)
				case s.release != 0:
					releases[s.release-1]()
				default:
					release, reason := l.Admit(netip.MustParseAddr(s.admit))
					if reason != s.want {
						t.Fatalf("step %d: admit %s: reason %q, want %q", i+1, s.admit, reason, s.want)
					}
					if (release == nil) != (reason != "") {
						t.Fatalf("step %d: admit %s: reason %q with release %v: want a release exactly when admitted", i+1, s.admit, reason, release != nil)
					}
					releases = append(releases, release)
				}
			}
			// Give every slot back: the concurrent map must end empty.
			for _, r := range releases {
				if r != nil {
					r()
				}
			}
			if n := len(l.conns); n != 0 {
				t.Fatalf("after every release %d addresses still counted: %v", n, l.conns)
			}
		})
	}
}

// 64 goroutines admit the same address at once: exactly maxConns win, and
// after every release the address holds nothing.
func TestClientLimiterCapHoldsUnderRace(t *testing.T) {
	const racers, maxConns = 64, 5
	addr := netip.MustParseAddr("198.51.100.9")
	for round := range 20 {
		l := NewClientLimiter(maxConns, 0, 16, nil)
		var (
			start    = make(chan struct{})
			wg       sync.WaitGroup
			admitted atomic.Int64
			mu       sync.Mutex
			releases []func()
		)
		for range racers {
			wg.Go(func() {
				<-start
				release, reason := l.Admit(addr)
				if reason == "" {
					admitted.Add(1)
					mu.Lock()
					releases = append(releases, release)
					mu.Unlock()
				} else if reason != string(RejectClientMaxConns) {
					t.Errorf("refused for %q, want %q", reason, string(RejectClientMaxConns))
				}
			})
		}
		close(start)
		wg.Wait()
		if got := admitted.Load(); got != maxConns {
			t.Fatalf("round %d: %d of %d racers admitted, want exactly %d", round, got, racers, maxConns)
		}
		// Release concurrently, each twice.
		for _, r := range releases {
			wg.Go(func() { r(); r() })
		}
		wg.Wait()
		if n := len(l.conns); n != 0 {
			t.Fatalf("round %d: after release %d addresses still counted", round, n)
		}
		if release, reason := l.Admit(addr); reason != "" {
			t.Fatalf("round %d: after release refused for %q", round, reason)
		} else {
			release()
		}
	}
}

// Ten times maxTracked addresses leave maxTracked buckets, the most
// recently used ones; an evicted address comes back with a full bucket.
func TestClientLimiterLRUBound(t *testing.T) {
	const maxTracked = 100
	clock := newFakeClock()
	l := NewClientLimiter(0, 1, maxTracked, clock.Now)
	for i := range 10 * maxTracked {
		if _, reason := l.Admit(addrN(i)); reason != "" {
			t.Fatalf("address %d: first connection refused for %q", i, reason)
		}
		if got := l.Tracked(); got > maxTracked {
			t.Fatalf("after %d addresses %d tracked, bound is %d", i+1, got, maxTracked)
		}
	}
	if got := l.Tracked(); got != maxTracked {
		t.Fatalf("%d tracked, want the bound %d", got, maxTracked)
	}
	// The last maxTracked addresses are the ones remembered: each is
	// still out of tokens.
	for i := 9 * maxTracked; i < 10*maxTracked; i++ {
		if _, reason := l.Admit(addrN(i)); reason != string(RejectClientRate) {
			t.Fatalf("recent address %d: reason %q, want %q (its bucket should be remembered)", i, reason, string(RejectClientRate))
		}
	}
	// Touching the oldest remembered address keeps it over the next one.
	oldest := addrN(9 * maxTracked)
	l.Admit(oldest)
	if _, reason := l.Admit(addrN(0)); reason != "" {
		t.Fatalf("evicted address 0 came back refused for %q, want a full bucket", reason)
	}
	if _, reason := l.Admit(oldest); reason != string(RejectClientRate) {
		t.Fatalf("recently used address was evicted before an older one (reason %q)", reason)
	}
	if _, ok := l.buckets[addrN(9*maxTracked+1)]; ok {
		t.Fatalf("least recently used address still tracked after an eviction")
	}
	// The list and the index agree.
	n := 0
	for b := l.head; b != nil; b = b.next {
		if l.buckets[b.addr] != b {
			t.Fatalf("list entry %v not indexed", b.addr)
		}
		n++
	}
	if n != len(l.buckets) {
		t.Fatalf("list holds %d entries, index %d", n, len(l.buckets))
	}
}

// A flood from one address, from several goroutines, does not refuse
// another address; its per-call latency is reported, not asserted (this
// machine is shared).
func TestClientLimiterFloodDoesNotSlowAnother(t *testing.T) {
	const (
		flooders      = 4
		floodPerG     = 50_000
		perSecond     = 1000 // the clock stands still: each address has one burst
		maxOtherCalls = perSecond
	)
	clock := newFakeClock()
	l := NewClientLimiter(8, perSecond, 1024, clock.Now)
	flood, other := netip.MustParseAddr("203.0.113.66"), netip.MustParseAddr("203.0.113.7")

	var (
		wg      sync.WaitGroup
		done    = make(chan struct{})
		refused atomic.Int64
	)
	for range flooders {
		wg.Go(func() {
			for range floodPerG {
				if release, reason := l.Admit(flood); reason == "" {
					release()
				} else {
					refused.Add(1)
				}
			}
		})
	}
	go func() { wg.Wait(); close(done) }()

	var latencies []time.Duration
loop:
	for range maxOtherCalls {
		select {
		case <-done:
			break loop
		default:
		}
		start := time.Now()
		release, reason := l.Admit(other)
		latencies = append(latencies, time.Since(start))
		if reason != "" {
			t.Fatalf("other address refused for %q during the flood (call %d)", reason, len(latencies))
		}
		release()
	}
	<-done
	if refused.Load() == 0 {
		t.Fatalf("the flood was never refused: the test measured nothing")
	}
	slices.Sort(latencies)
	pct := func(p float64) time.Duration { return latencies[int(p*float64(len(latencies)-1))] }
	t.Logf("other address: %d calls during a flood of %d calls (%d refused) from %d goroutines; Admit latency p50 %v, p99 %v, max %v",
		len(latencies), flooders*floodPerG, refused.Load(), flooders, pct(0.5), pct(0.99), latencies[len(latencies)-1])
}

func BenchmarkAdmit(b *testing.B) {
	for _, bc := range []struct {
		name      string
		maxConns  int
		perSecond float64
		addrs     int
	}{
		{"off", 0, 0, 1},
		{"cap and rate, one tracked address", 1 << 20, 1e12, 1},
		{"rate only, one tracked address", 0, 1e12, 1},
		{"cap and rate, 1000 tracked addresses", 1 << 20, 1e12, 1000},
		{"cap and rate, 64Ki addresses cycled through 1024 buckets", 1 << 20, 1e12, 1 << 16},
	} {
		b.Run(bc.name, func(b *testing.B) {
			l := NewClientLimiter(bc.maxConns, bc.perSecond, 1024, nil)
			addrs := make([]netip.Addr, bc.addrs)
			for i := range addrs {
				addrs[i] = addrN(i)
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				release, reason := l.Admit(addrs[i%len(addrs)])
				if reason != "" {
					b.Fatalf("refused: %s", reason)
				}
				release()
				i++
			}
		})
	}
	b.Run("cap and rate, parallel, one address per goroutine", func(b *testing.B) {
		l := NewClientLimiter(1<<20, 1e12, 1024, nil)
		var next atomic.Int64
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			addr := addrN(int(next.Add(1)))
			for pb.Next() {
				release, reason := l.Admit(addr)
				if reason != "" {
					b.Fatal("refused: " + reason)
				}
				release()
			}
		})
	})
}
