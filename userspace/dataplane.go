package userspace

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"
)

// Dataplane moves the bytes of accepted connections to their backends.
type Dataplane interface {
	// Name is "sockmap" or "splice".
	Name() string
	// Serve accepts on ln until accept ends; it then closes ln and lets
	// established connections finish. When stop ends it resets those
	// still open. It returns once every connection is gone. Serve owns ln
	// and every connection it accepts: nothing else touches them.
	Serve(accept, stop context.Context, ln *net.TCPListener) error
	// Stats reports the plane's own counters for metrics and tests.
	Stats() PlaneStats
}

// PlaneStats are counters every data plane keeps.
type PlaneStats struct {
	Active   int               // client connections currently held
	Verdicts map[string]uint64 // sockmap only: verdict counts by reason
	Sockets  int               // sockmap only: sockhash entries
	Pairings int               // sockmap only: pairing entries
	// Accepted is how many connections each event loop has accepted
	// (sockmap only), so an operator sees the loops share the work.
	Accepted []uint64
}

// planeEnv is what both planes share: the decision, the dial timeout, the
// logger and the close hook.
type planeEnv struct {
	balancer       *Balancer
	connectTimeout time.Duration // for all attempts of one connection together
	retries        int           // further backends tried after a failed dial
	workers        int           // event loops of the sockmap plane
	admission      *admission
	keepalive      time.Duration // TCP keepalive idle time; 0: off
	idleTimeout    time.Duration // close connections idle both ways this long; 0: off
	stallTimeout   time.Duration // reset a direction stuck this long; 0: off
	bufferBudget   uint64        // bytes all connections may park in psock queues
	log            *slog.Logger
	// warn rate-limits lines that would otherwise repeat per connection.
	warn *throttledLog
	// onClose is called once per finished connection with its summary.
	onClose func(ConnSummary)
	// proxyHeaders is the inbound PROXY protocol policy.
	proxyHeaders proxyHeaderPolicy
}

// keepaliveInterval and keepaliveProbes follow from the idle time: five
// probes a fifth of it apart, so a vanished peer is reaped about two idle
// times after its last byte.
func keepaliveInterval(idle time.Duration) time.Duration { return max(idle/5, time.Second) }

const keepaliveProbes = 5

// attemptTimeout splits what is left of the connect budget evenly over
// the attempts left, so a backend that swallows SYNs cannot use up the
// whole budget before a retry gets its turn.
func attemptTimeout(deadline, now time.Time, attemptsLeft int) time.Duration {
	return deadline.Sub(now) / time.Duration(max(attemptsLeft, 1))
}

// afterFailedDial decides what a failed dial leads to, the same on both
// planes: a local exhaustion refuses the client as max_conns and says
// nothing about the backend; otherwise the failure counts against the
// backend and the next best untried backend is leased while attempts and
// time are left. next is nil when the connection must be reset with
// reason and cause.
func (e planeEnv) afterFailedDial(plane string, client netip.AddrPort, failed *Lease, connectBy time.Time, err error) (next *Lease, reason, cause string) {
	if localExhaustion(err) {
		e.balancer.countReject(RejectMaxConns)
		e.warn.Warn("exhausted", "refusing client: this host is out of descriptors or buffers", "client", client, "err", err)
		return nil, "max_conns", err.Error()
	}
	failed.Failed(err)
	e.warn.Warn("dial:"+failed.Backend.ID, "dial backend failed", "client", client, "backend", failed.Backend.ID,
		"addr", failed.Backend.AddrPort(), "attempt", failed.Attempts(), "err", err)
	if failed.Attempts() > e.retries || !time.Now().Before(connectBy) {
		e.balancer.countReject(RejectAllDialsFailed)
		return nil, "connect_failed", err.Error()
	}
	next, reject := e.balancer.AcquireNext(failed)
	if next == nil {
		return nil, "connect_failed", fmt.Sprintf("%s; no other backend: %s", err, reject)
	}
	e.logOpen(plane, client, next)
	return next, "", ""
}

// logOpen writes the debug line of a routed connection.
func (e planeEnv) logOpen(plane string, client netip.AddrPort, l *Lease) {
	if !e.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	e.log.Debug("connection opened", "client", client, "country", l.Client.Country, "region", l.Client.Region,
		"backend", l.Backend.ID, "score", e.balancer.ScoreOf(l), "sticky", l.Sticky, "dataplane", plane)
}

// ConnSummary describes one finished connection for logs and metrics.
type ConnSummary struct {
	Client    netip.AddrPort
	Backend   string
	BytesIn   uint64 // client to backend
	BytesOut  uint64 // backend to client
	Duration  time.Duration
	End       string // "closed", "reset", "connect_failed", "shutdown"
	Dataplane string
}
