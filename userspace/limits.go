package userspace

import (
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// ClientLimiter admits or refuses a new connection by client address: at
// most maxConns open at once and perSecond new ones per second (a token
// bucket with a burst of one second's worth). It holds no sockets; the data
// planes call Admit from any goroutine.
//
// Concurrent counts are exact: an address has an entry while it holds at
// least one connection, so that map is bounded by the open connections.
// Rate buckets live in a least-recently-used list of at most maxTracked
// addresses; evicting one only forgets its rate history.
type ClientLimiter struct {
	maxConns   int
	limit      rate.Limit
	burst      int
	maxTracked int
	now        func() time.Time

	mu    sync.Mutex
	conns map[netip.Addr]int // open connections by address; no zero entries
	// buckets indexes the rate buckets; head is the most recently used,
	// tail the next to evict.
	buckets    map[netip.Addr]*rateBucket
	head, tail *rateBucket
}

// rateBucket is one address's token bucket and its place in the LRU list.
type rateBucket struct {
	addr       netip.Addr
	lim        *rate.Limiter
	prev, next *rateBucket
}

// NewClientLimiter returns a limiter with a concurrent cap of maxConns and
// a rate of perSecond new connections per address; 0 disables either. It
// remembers the rate of at most maxTracked addresses (at least one). now is
// the clock; nil means time.Now.
func NewClientLimiter(maxConns int, perSecond float64, maxTracked int, now func() time.Time) *ClientLimiter {
	if now == nil {
		now = time.Now
	}
	l := &ClientLimiter{
		maxConns:   max(0, maxConns),
		maxTracked: max(1, maxTracked),
		now:        now,
		conns:      map[netip.Addr]int{},
	}
	// NaN and +Inf, like 0, mean no rate limit.
	if perSecond > 0 && !math.IsInf(perSecond, 1) {
		l.limit = rate.Limit(perSecond)
		l.burst = max(1, int(math.Ceil(perSecond)))
		l.buckets = make(map[netip.Addr]*rateBucket, min(l.maxTracked, 1024))
	}
	return l
}

// noRelease is the release of an admission that reserved no slot.
func noRelease() {}

// Admit reserves a slot for addr (IPv4-mapped addresses unmapped first). On
// refusal it returns reason "client_max_conns" or "client_rate" and a nil
// release. release gives the slot back exactly once (safe to call twice).
//
// The concurrent cap is checked first, so a refused connection of an
// address at its cap does not spend a rate token.
func (l *ClientLimiter) Admit(addr netip.Addr) (release func(), reason string) {
	if l.maxConns == 0 && l.limit == 0 {
		return noRelease, ""
	}
	addr = addr.Unmap()
	l.mu.Lock()
	n := l.conns[addr]
	if l.maxConns > 0 && n >= l.maxConns {
		l.mu.Unlock()
		return nil, string(RejectClientMaxConns)
	}
	if l.limit > 0 && !l.bucket(addr).AllowN(l.now(), 1) {
		l.mu.Unlock()
		return nil, string(RejectClientRate)
	}
	if l.maxConns == 0 {
		l.mu.Unlock()
		return noRelease, ""
	}
	l.conns[addr] = n + 1
	l.mu.Unlock()
	// What an admission allocates (the closure and its flag, about 50
	// bytes): a release that knows whether it already ran. A recycled one
	// could not tell a late second call from the next owner's.
	var done atomic.Bool
	return func() {
		if done.CompareAndSwap(false, true) {
			l.release(addr)
		}
	}, ""
}

func (l *ClientLimiter) release(addr netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.conns[addr]; n > 1 {
		l.conns[addr] = n - 1
	} else {
		delete(l.conns, addr)
	}
}

// bucket returns addr's rate bucket, now the most recently used, making
// one (and evicting the least recently used past maxTracked) if needed.
// Called with mu held.
func (l *ClientLimiter) bucket(addr netip.Addr) *rate.Limiter {
	if b, ok := l.buckets[addr]; ok {
		l.moveToFront(b)
		return b.lim
	}
	var b *rateBucket
	if len(l.buckets) >= l.maxTracked {
		// Reuse the evicted entry: only the limiter is new.
		b = l.tail
		l.unlink(b)
		delete(l.buckets, b.addr)
	} else {
		b = &rateBucket{}
	}
	b.addr = addr
	b.lim = rate.NewLimiter(l.limit, l.burst)
	l.buckets[addr] = b
	l.pushFront(b)
	return b.lim
}

func (l *ClientLimiter) moveToFront(b *rateBucket) {
	if l.head == b {
		return
	}
	l.unlink(b)
	l.pushFront(b)
}

func (l *ClientLimiter) unlink(b *rateBucket) {
	if b.prev != nil {
		b.prev.next = b.next
	} else {
		l.head = b.next
	}
	if b.next != nil {
		b.next.prev = b.prev
	} else {
		l.tail = b.prev
	}
	b.prev, b.next = nil, nil
}

func (l *ClientLimiter) pushFront(b *rateBucket) {
	b.next = l.head
	if l.head != nil {
		l.head.prev = b
	}
	l.head = b
	if l.tail == nil {
		l.tail = b
	}
}

// Tracked is how many addresses have a rate bucket: at most maxTracked,
// 0 when the rate is disabled.
func (l *ClientLimiter) Tracked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}
