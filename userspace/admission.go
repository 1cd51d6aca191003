package userspace

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
)

// clientAdmitter is the per-client-address limiter (ClientLimiter).
type clientAdmitter interface {
	Admit(addr netip.Addr) (release func(), reason string)
}

// admission decides whether a new client is served at all, before a
// backend is chosen: the process-wide connection cap first (so descriptors
// never run out before it), then the per-address limits.
type admission struct {
	maxConns int64 // 0: no cap
	conns    atomic.Int64
	clients  clientAdmitter // nil: no per-client limits
	balancer *Balancer      // counts refusals by reason
}

// admit reserves a place for a client. On refusal release is nil and the
// refusal is already counted.
func (a *admission) admit(addr netip.Addr) (release func(), reason routing.RejectReason) {
	if !a.reserve() {
		return nil, RejectMaxConns
	}
	return a.admitReserved(addr)
}

// reserve takes a place under the process-wide cap alone, for a
// connection whose client is not known yet (its PROXY header is still to
// come): pending headers hold descriptors, so they count against the cap.
// On refusal it is already counted. The place is given back by
// admitReserved's release or by unreserve.
func (a *admission) reserve() bool {
	if n := a.conns.Add(1); a.maxConns > 0 && n > a.maxConns {
		a.conns.Add(-1)
		a.balancer.countReject(RejectMaxConns)
		return false
	}
	return true
}

func (a *admission) unreserve() { a.conns.Add(-1) }

// admitReserved applies the per-address limits to a client that already
// holds a place from reserve. On refusal the place is given back and the
// refusal counted.
func (a *admission) admitReserved(addr netip.Addr) (release func(), reason routing.RejectReason) {
	var releaseClient func()
	if a.clients != nil {
		r, why := a.clients.Admit(addr)
		if r == nil {
			a.conns.Add(-1)
			reason := routing.RejectReason(why)
			a.balancer.countReject(reason)
			return nil, reason
		}
		releaseClient = r
	}
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			a.conns.Add(-1)
			if releaseClient != nil {
				releaseClient()
			}
		}
	}, ""
}

// localExhaustion reports errors that say this host ran out of something
// (descriptors, buffers, ports), not that the backend failed: they must
// never count against a backend's health.
func localExhaustion(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.EADDRNOTAVAIL} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// throttledLog writes a repeating line at most once per period per key
// and says how many it left out, so a fault that repeats per connection
// costs one line per period, not one per connection.
type throttledLog struct {
	log    *slog.Logger
	period time.Duration
	mu     sync.Mutex
	keys   map[string]*throttle
}

type throttle struct {
	last       time.Time
	suppressed int
}

func newThrottledLog(log *slog.Logger, period time.Duration) *throttledLog {
	return &throttledLog{log: log, period: period, keys: map[string]*throttle{}}
}

// Warn logs msg with args unless key was logged within the period.
func (l *throttledLog) Warn(key, msg string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	th := l.keys[key]
	if th == nil {
		if len(l.keys) > 4096 {
			clear(l.keys) // keys carry backend ids: bound them
		}
		th = &throttle{}
		l.keys[key] = th
	}
	if !th.last.IsZero() && now.Sub(th.last) < l.period {
		th.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := th.suppressed
	th.last, th.suppressed = now, 0
	l.mu.Unlock()
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed, "per", l.period)
	}
	l.log.Warn(msg, args...)
}

// AsyncWriter hands log lines to a goroutine that writes them, so a slow
// reader of stderr (a stalled journald, a full pipe) never blocks the
// event loop. When its queue is full, lines are dropped and counted, and
// the count is written with the next line that gets through.
type AsyncWriter struct {
	out     io.Writer
	lines   chan []byte
	dropped atomic.Uint64
	done    chan struct{}
	mu      sync.RWMutex // Close waits for writes in flight
	closed  bool
}

// NewAsyncWriter writes to out through a queue of depth lines.
func NewAsyncWriter(out io.Writer, depth int) *AsyncWriter {
	w := &AsyncWriter{out: out, lines: make(chan []byte, depth), done: make(chan struct{})}
	go w.run()
	return w
}

func (w *AsyncWriter) run() {
	defer close(w.done)
	for line := range w.lines {
		if n := w.dropped.Swap(0); n > 0 {
			_, _ = io.WriteString(w.out, "level=WARN msg=\"log lines dropped: stderr too slow\" dropped="+itoa(n)+"\n")
		}
		_, _ = w.out.Write(line)
	}
}

// Write queues a copy of p; it never blocks.
func (w *AsyncWriter) Write(p []byte) (int, error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		return w.out.Write(p)
	}
	line := append([]byte(nil), p...)
	select {
	case w.lines <- line:
	default:
		w.dropped.Add(1)
	}
	return len(p), nil
}

// Close writes what is queued and returns; later writes go straight out.
func (w *AsyncWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.closed = true
		close(w.lines)
		<-w.done
	}
	return nil
}

func itoa(n uint64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			break
		}
	}
	return string(b[i:])
}
