package userspace

import (
	"context"
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
}

// planeEnv is what both planes share: the decision, the dial timeout, the
// logger and the close hook.
type planeEnv struct {
	balancer       *Balancer
	connectTimeout time.Duration
	log            *slog.Logger
	// onClose is called once per finished connection with its summary.
	onClose func(ConnSummary)
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
