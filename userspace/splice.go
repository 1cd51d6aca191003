package userspace

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// spliceLoops is the splice data plane: EDGEPROXY_WORKERS event loops,
// each accepting from the one listening socket (woken one at a time with
// EPOLLEXCLUSIVE) and owning the connections it accepted, start to end.
// The bytes move socket -> pipe -> socket with splice(2), so no payload
// crosses userspace; a pipe is borrowed from a small pool only while a
// direction has bytes in flight, so an idle connection holds just its two
// sockets. What the loops share is safe to share: the balancer, the
// admission counters and the pipe count.
type spliceLoops struct {
	loops  []*spliceLoop
	shared *spliceShared
}

// spliceShared is what every loop of the plane adds to.
type spliceShared struct {
	active atomic.Int64 // connections held, all loops
	pipes  pipeBudget   // pipes open, all loops
}

func newSplicePlane(env planeEnv) *spliceLoops {
	shared := &spliceShared{}
	l := &spliceLoops{shared: shared}
	for range max(env.workers, 1) {
		l.loops = append(l.loops, newSpliceLoop(env, shared))
	}
	return l
}

func (l *spliceLoops) Name() string { return "splice" }

// Workers is the number of event loops.
func (l *spliceLoops) Workers() int { return len(l.loops) }

func (l *spliceLoops) Stats() PlaneStats {
	st := PlaneStats{Active: int(l.shared.active.Load())}
	for _, loop := range l.loops {
		st.Accepted = append(st.Accepted, loop.accepted.Load())
	}
	return st
}

// Serve runs every loop on its own descriptor of the listening socket
// until each has drained. A loop that fails stops the others (their
// connections are reset) and its error is returned.
func (l *spliceLoops) Serve(accept, stop context.Context, ln *net.TCPListener) error {
	// The pipe bound follows the connection cap, which New settles after
	// the plane is built.
	l.shared.pipes.limit = int64(splicePipesFor(l.loops[0].env.admission.maxConns))
	serves := make([]loopServe, len(l.loops))
	for i, loop := range l.loops {
		if len(l.loops) > 1 {
			loop.lnEvents |= unix.EPOLLEXCLUSIVE
		}
		serves[i] = loop.serve
	}
	return serveLoops(accept, stop, ln, serves)
}

// minReceiveLimit keeps a capped receive buffer large enough for a LAN's
// bandwidth-delay product.
const minReceiveLimit = 256 << 10

// receiveLimit is one direction's share of the buffer budget
// (EDGEPROXY_MAX_BUFFERED_MB) for its receive queue, or 0
// when the share is above what autotuning would reach anyway (tcp_rmem's
// maximum): then the kernel's own tuning is kept. A direction's bytes wait
// in the receive queue of the socket they arrive on while its reader is
// slow, so with every connection at its share all of them park at most the
// budget there.
func receiveLimit(budget uint64, active int64) int {
	if budget == 0 {
		return 0
	}
	share := budget / uint64(max(2*active, 1))
	// A direction's bytes wait in two queues, the receive queue they
	// arrive in and the send queue they leave by: half the share each.
	limit := share / 2
	if limit >= uint64(tcpRmemMax()) {
		return 0
	}
	return int(max(limit, minReceiveLimit))
}

var (
	tcpRmemOnce sync.Once
	tcpRmemVal  int
)

// tcpRmemMax is the largest receive buffer autotuning gives a socket
// (net.ipv4.tcp_rmem's third field); 6 MiB, Linux's default, when unread.
func tcpRmemMax() int {
	tcpRmemOnce.Do(func() {
		tcpRmemVal = 6 << 20
		b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
		if err != nil {
			return
		}
		if f := strings.Fields(string(b)); len(f) == 3 {
			if n, err := strconv.Atoi(f[2]); err == nil && n > 0 {
				tcpRmemVal = n
			}
		}
	})
	return tcpRmemVal
}

// spliceSweepPeriod is how often a loop looks for idle and stalled
// connections (EDGEPROXY_IDLE_TIMEOUT_SECS, EDGEPROXY_STALL_TIMEOUT_SECS).
const spliceSweepPeriod = time.Second
