// Package userspace is the running proxy: listener, connection life cycle,
// the sockmap and splice data planes, and the routing wiring.
package userspace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/prometheus/client_golang/prometheus"
)

// Config is everything `edgeproxy run` takes from flags and environment.
type Config struct {
	ListenAddr     string
	DBPath         string
	Region         string
	DBReload       time.Duration
	BindingTTL     time.Duration
	BindingGC      time.Duration
	GeoIPPath      string
	Dataplane      string // auto, sockmap or splice
	AdminAddr      string
	PinPath        string
	ConnectTimeout time.Duration
	Drain          time.Duration // EDGEPROXY_DRAIN_SECS

	Health         HealthConfig  // EDGEPROXY_HEALTH_*
	ConnectRetries int           // EDGEPROXY_CONNECT_RETRIES
	ClientMaxConns int           // EDGEPROXY_CLIENT_MAX_CONNS; 0: off
	ClientRate     float64       // EDGEPROXY_CLIENT_RATE, per second; 0: off
	MaxConns       int           // EDGEPROXY_MAX_CONNS; 0: derived from the open-file limit
	Keepalive      time.Duration // EDGEPROXY_KEEPALIVE_SECS; 0: off
	IdleTimeout    time.Duration // EDGEPROXY_IDLE_TIMEOUT_SECS; 0: off
	MaxBufferedMB  int           // EDGEPROXY_MAX_BUFFERED_MB
	StallTimeout   time.Duration // EDGEPROXY_STALL_TIMEOUT_SECS; 0: off
	Workers        int           // EDGEPROXY_WORKERS; 0: one per CPU the process may run on
	// ProxyProtocolFrom are the upstreams whose connections must start
	// with a PROXY header (EDGEPROXY_PROXY_PROTOCOL_FROM); empty: none.
	ProxyProtocolFrom    []netip.Prefix
	ProxyProtocolTimeout time.Duration // EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS
	// LoadOptions are how routing.db is read (the overlay's host
	// addresses and POP id); New adds the listen-address check.
	LoadOptions routing.LoadOptions
	// OnTable, if set, is called with every routing table published
	// (the first included), from the reload goroutine: the overlay
	// follows the pops table through it.
	OnTable func(*routing.Table)
	// Collectors are extra metrics served on /metrics (the overlay's).
	Collectors []prometheus.Collector
	// Etcd, if set, reports the etcd follower for /status.
	Etcd func() EtcdStatus
	// Handover, if set, holds the sockets a running edgeproxy handed to
	// this process (`edgeproxy upgrade`): New serves on them instead of
	// binding, and Run commits the hand-over once it serves.
	Handover *Handover
	// OnServing, if set, is called once Run serves (and, in a hand-over,
	// the predecessor stopped accepting), with the predecessor's pid or 0;
	// or with the error of a hand-over that could not be committed (this
	// process then drains what it accepted and the old one serves on).
	OnServing func(predecessor int, err error)
}

// Proxy is a configured, listening edgeproxy.
type Proxy struct {
	cfg       Config
	log       *slog.Logger
	store     *routing.Store
	geo       *routing.GeoSource
	balancer  *Balancer
	ln        *net.TCPListener
	plane     Dataplane
	admission *admission
	// DataplaneReason says why this data plane runs.
	DataplaneReason string
	closePlane      func() error
	admin           *http.Server
	adminLn         net.Listener
	reloads         reloadLog
	// applying serializes onReload: the poll, SIGHUP and the etcd
	// follower all reload.
	applying        sync.Mutex
	collectorErrors prometheus.Counter
	extraCollectors []prometheus.Collector
	// headerRefusals counts refused PROXY headers by cause.
	headerRefusals headerRefusalCounts

	maps    *loader.Sockmap   // nil: no BPF state
	control *net.UnixListener // hand-over requests from a successor
	// handoverFiles duplicate the sockets a successor takes over; closed
	// once handed over.
	handoverMu    sync.Mutex
	handoverFiles handoverFiles
	handingOver   atomic.Bool
	handoverReq   chan handoverStep
	accepting     atomic.Bool
	successor     *net.UnixConn // to send the final counters on, guarded by handoverMu
}

// draining says this process no longer accepts.
func (p *Proxy) draining() bool { return !p.accepting.Load() }

// New opens the routing database and geo database, picks the data plane and
// binds the listen address. Every failure names its cause.
func New(cfg Config, log *slog.Logger) (*Proxy, error) {
	switch cfg.Dataplane {
	case "auto", "sockmap", "splice":
	default:
		return nil, fmt.Errorf("data plane %q: must be auto, sockmap or splice", cfg.Dataplane)
	}
	opts := cfg.LoadOptions
	opts.IsSelf = SelfCheck(cfg.ListenAddr)
	store, err := routing.OpenStoreWith(cfg.DBPath, opts)
	if err != nil {
		return nil, fmt.Errorf("open routing database: %w", err)
	}
	geo, err := routing.NewGeoSource(cfg.GeoIPPath)
	if err != nil {
		return nil, fmt.Errorf("open geo database: %w", err)
	}
	if cfg.Workers <= 0 {
		cfg.Workers = runtime.NumCPU() // the CPUs this process may run on
	}
	p := &Proxy{cfg: cfg, log: log, store: store, geo: geo, extraCollectors: cfg.Collectors}
	p.balancer = &Balancer{Store: store, Geo: geo, LocalRegion: cfg.Region, Now: time.Now, BindingTTL: cfg.BindingTTL,
		Health: cfg.Health, Log: log}

	p.reloads.record(nil)
	p.handoverReq = make(chan handoverStep)
	if err := p.listen(); err != nil {
		return nil, err
	}
	// Keepalive is set on the listener before anything is accepted: the
	// sockmap plane's clients inherit it from there, also those that
	// connect the instant the proxy says it serves.
	if raw, err := p.ln.SyscallConn(); err == nil {
		var kerr error
		if err := raw.Control(func(fd uintptr) { kerr = setKeepalive(int(fd), cfg.Keepalive) }); err == nil && kerr != nil {
			log.Warn("cannot set keepalive on the listener", "listen", cfg.ListenAddr, "err", kerr)
		}
	}

	p.admission = &admission{balancer: p.balancer}
	if cfg.ClientMaxConns > 0 || cfg.ClientRate > 0 {
		p.admission.clients = NewClientLimiter(cfg.ClientMaxConns, cfg.ClientRate, clientsTracked, time.Now)
	}
	env := planeEnv{
		balancer: p.balancer, connectTimeout: cfg.ConnectTimeout, retries: cfg.ConnectRetries, workers: cfg.Workers,
		admission: p.admission, keepalive: cfg.Keepalive, idleTimeout: cfg.IdleTimeout,
		stallTimeout: cfg.StallTimeout, bufferBudget: uint64(cfg.MaxBufferedMB) << 20,
		log: log, warn: newThrottledLog(log, 10*time.Second), onClose: p.onClose,
		proxyHeaders: proxyHeaderPolicy{from: cfg.ProxyProtocolFrom, timeout: cfg.ProxyProtocolTimeout, refused: &p.headerRefusals},
	}
	if err := p.choosePlane(env); err != nil {
		p.closeListeners()
		return nil, err
	}
	if err := p.keepForHandover(); err != nil {
		p.closeListeners()
		if p.closePlane != nil {
			p.closePlane()
		}
		return nil, err
	}
	adminConns := 0
	if p.adminLn != nil {
		adminConns = defaultAdminLimits.MaxConns
	}
	fileCap := maxConnsForFileLimit(cfg.Health.Workers, adminConns)
	p.admission.maxConns = int64(cfg.MaxConns)
	switch {
	case cfg.MaxConns == 0:
		p.admission.maxConns = fileCap
	case fileCap > 0 && int64(cfg.MaxConns) > fileCap:
		log.Warn("EDGEPROXY_MAX_CONNS is above what the open-file limit holds: descriptors may run out first",
			"max_conns", cfg.MaxConns, "open_file_limit_holds", fileCap)
	}
	if p.adminLn != nil {
		p.admin = p.newAdminServer()
	}
	return p, nil
}

// listen binds the listening, admin and control sockets, or takes them
// from the hand-over. Taken over, they are the very sockets the running
// process accepts on: its accept queue is shared, nothing is rebound.
func (p *Proxy) listen() error {
	cfg := p.cfg
	if h := cfg.Handover; h != nil {
		p.ln, p.control = h.Listener, h.Control
		switch {
		case h.Admin != nil && cfg.AdminAddr == "":
			h.Admin.Close() // admin HTTP turned off by this configuration
		case h.Admin != nil:
			p.adminLn = h.Admin
		case cfg.AdminAddr != "":
			aln, err := net.Listen("tcp", cfg.AdminAddr)
			if err != nil {
				return fmt.Errorf("admin listen on %s: %w", cfg.AdminAddr, err)
			}
			p.adminLn = aln
		}
		return nil
	}
	if cfg.AdminAddr != "" {
		aln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			return fmt.Errorf("admin listen on %s: %w", cfg.AdminAddr, err)
		}
		p.adminLn = aln
	}
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		p.closeListeners()
		return fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}
	p.ln = ln.(*net.TCPListener)
	if p.control, err = listenControl(cfg.ListenAddr); err != nil {
		p.closeListeners()
		return err
	}
	return nil
}

func (p *Proxy) closeListeners() {
	if p.ln != nil {
		p.ln.Close()
	}
	if p.adminLn != nil {
		p.adminLn.Close()
	}
	if p.control != nil {
		p.control.Close()
	}
	if h := p.cfg.Handover; h != nil && h.Lock != nil && p.maps == nil {
		h.Lock.Close()
	}
}

// keepForHandover duplicates what a successor will take over.
func (p *Proxy) keepForHandover() error {
	add := func(name string, ln net.Listener) error {
		f, err := listenerFile(ln)
		if err != nil {
			return fmt.Errorf("keep the %s socket for a hand-over: %w", name, err)
		}
		p.handoverFiles.add(name, f)
		return nil
	}
	if err := add("listener", p.ln); err != nil {
		return err
	}
	if p.adminLn != nil {
		if err := add("admin", p.adminLn); err != nil {
			p.handoverFiles.close()
			return err
		}
	}
	if err := add("control", p.control); err != nil {
		p.handoverFiles.close()
		return err
	}
	if p.maps != nil {
		lock, err := dupFile(p.maps.LockFile())
		if err != nil {
			p.handoverFiles.close()
			return fmt.Errorf("keep the pin lock for a hand-over: %w", err)
		}
		p.handoverFiles.add("lock", lock)
	}
	return nil
}

func dupFile(f *os.File) (*os.File, error) {
	orig, err := rawFD(f)
	if err != nil {
		return nil, err
	}
	fd, err := syscall.Dup(orig)
	if err != nil {
		return nil, err
	}
	syscall.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// SelfCheck reports whether a backend address is this proxy's own
// listener, which it would dial until descriptors run out. With an
// unspecified listen address every local address on the listen port is
// the proxy itself.
func SelfCheck(listen string) func(netip.AddrPort) bool {
	host, portText, err := net.SplitHostPort(listen)
	if err != nil {
		return nil
	}
	port, err := net.LookupPort("tcp", portText)
	if err != nil {
		return nil
	}
	var bound netip.Addr
	if host != "" {
		if bound, err = netip.ParseAddr(host); err != nil {
			return nil // a name: Listen resolves it, and so would we
		}
		bound = bound.Unmap()
	}
	return func(ap netip.AddrPort) bool {
		if int(ap.Port()) != port {
			return false
		}
		a := ap.Addr().Unmap().WithZone("")
		if bound.IsValid() && !bound.IsUnspecified() {
			return a == bound
		}
		if a.IsLoopback() {
			return true
		}
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return false
		}
		for _, ia := range addrs {
			if pfx, err := netip.ParsePrefix(ia.String()); err == nil && pfx.Addr().Unmap().WithZone("") == a {
				return true
			}
		}
		return false
	}
}

// clientsTracked bounds the per-address rate buckets kept in memory.
const clientsTracked = 1 << 16

// maxConnsForFileLimit is EDGEPROXY_MAX_CONNS's default: as many
// connections as the open-file limit holds after a reserve, so that the cap
// refuses a client before descriptors run out. The reserve is what the
// process holds already (listeners, BPF objects, the database watcher),
// what the admin server may hold at most, one per health probe in flight,
// and a margin. A connection holds its 2 sockets; the pipes (2
// descriptors each) are lent only to directions with bytes in flight, at
// most one per 4 connections (spliceConnsForFiles): on the splice plane to
// every such direction, on the sockmap plane to the streaming ones.
func maxConnsForFileLimit(healthWorkers, adminConns int) int64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur == ^uint64(0) {
		return 0
	}
	reserve := uint64(openFiles() + adminConns + healthWorkers + fileMargin)
	if lim.Cur <= reserve {
		return 1
	}
	return int64(max(spliceConnsForFiles(lim.Cur-reserve), 1))
}

// fileMargin covers descriptors opened briefly: a routing.db reload, a geo
// database refresh, a client accepted only to be refused.
const fileMargin = 16

// openFiles counts this process's open descriptors.
func openFiles() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 64 // not Linux or no /proc: assume a typical start
	}
	return len(entries)
}

// choosePlane loads the BPF state where BPF is usable (it also holds the
// backends and affinity maps operators inspect) and picks the data plane.
func (p *Proxy) choosePlane(env planeEnv) error {
	var maps *loader.Sockmap
	var err error
	if h := p.cfg.Handover; h != nil && h.Lock != nil {
		// The running process holds BPF state: share it or refuse the
		// hand-over, never fall back to a plane with counts of its own.
		if maps, err = loader.OpenHandedOver(p.cfg.PinPath, h.Lock); err != nil {
			return fmt.Errorf("take over the BPF state of pid %d: %w", h.PredecessorPID, err)
		}
		h.Lock = nil // the loader owns it now
	} else {
		maps, err = loader.Open(p.cfg.PinPath)
		if err != nil && (p.cfg.Dataplane == "sockmap" || errors.Is(err, loader.ErrAlreadyLoaded)) {
			return fmt.Errorf("data plane sockmap: %w", err)
		}
	}
	if maps != nil {
		p.maps = maps
		p.closePlane = maps.Close
		p.balancer.Affinity, p.balancer.Mirror = maps.Affinity(), maps
		if p.cfg.Handover != nil {
			p.balancer.AdoptSlots(maps.BackendSlots())
		}
	} else {
		p.balancer.Affinity = newMemoryAffinity()
	}
	if p.cfg.BindingTTL <= 0 {
		p.balancer.Affinity = nil // EDGEPROXY_BINDING_TTL_SECS=0: no affinity
	}
	switch {
	case p.cfg.Dataplane == "splice":
		p.plane, p.DataplaneReason = newSplicePlane(env), "requested with EDGEPROXY_DATAPLANE=splice"
	case maps != nil:
		p.plane = newSockmapPlane(env, maps)
		p.DataplaneReason = "BPF probe passed; maps pinned at " + p.cfg.PinPath
		if p.cfg.Dataplane == "sockmap" {
			p.DataplaneReason = "requested with EDGEPROXY_DATAPLANE=sockmap; maps pinned at " + p.cfg.PinPath
		}
	default:
		p.plane, p.DataplaneReason = newSplicePlane(env), "sockmap unusable: "+err.Error()
	}
	return nil
}

// workers is the number of event loops serving connections
// (EDGEPROXY_WORKERS on either plane); 1 for a plane without loops.
func (p *Proxy) workers() int {
	if w, ok := p.plane.(interface{ Workers() int }); ok {
		return w.Workers()
	}
	return 1
}

// Addr is the bound listen address.
func (p *Proxy) Addr() net.Addr { return p.ln.Addr() }

// Plane is the running data plane.
func (p *Proxy) Plane() Dataplane { return p.plane }

// Balancer is the decision and counting front of the proxy.
func (p *Proxy) Balancer() *Balancer { return p.balancer }

// Run serves until told to stop. The first SIGTERM or SIGINT stops
// accepting and lets established connections finish for up to
// Config.Drain; a second one, or the end of the drain, closes the rest.
// SIGHUP reloads the routing and geo databases at once.
func (p *Proxy) Run(signals <-chan os.Signal) error {
	p.log.Info("edgeproxy started",
		"listen", p.ln.Addr().String(), "region", p.cfg.Region,
		"dataplane", p.plane.Name(), "reason", p.DataplaneReason,
		"db", p.cfg.DBPath, "geoip", p.geo.Describe(),
		"backends", len(p.store.Current().Backends), "admin", p.cfg.AdminAddr,
		"max_conns", p.admission.maxConns, "health_interval", p.cfg.Health.Interval, "workers", p.workers())
	accept, stopAccepting := context.WithCancel(context.Background())
	stop, stopAll := context.WithCancel(context.Background())
	defer stopAll()
	for _, re := range p.store.RowErrors() {
		p.log.Warn("routing row skipped", "err", re.Error())
	}
	if err := p.balancer.Refresh(); err != nil {
		p.log.Warn("cannot mirror the backend table into BPF", "err", err)
	}
	// Count the bindings a previous process left before any is added.
	if _, err := p.balancer.SweepBindings(); err != nil {
		p.log.Warn("affinity sweep failed", "err", err)
	}
	if p.cfg.OnTable != nil {
		p.cfg.OnTable(p.store.Current())
		go every(stop, p.cfg.DBReload, p.reapplyTable)
	}
	go p.store.Watch(stop, routing.DefaultPoll, p.cfg.DBReload, p.onReload)
	go p.balancer.runHealthChecks(stop, p.cfg.Health, tcpProbe)
	go every(stop, time.Second, p.refreshGeo)
	if p.balancer.Affinity != nil {
		go every(stop, p.cfg.BindingGC, p.sweepBindings)
	}
	p.accepting.Store(true)
	served := make(chan error, 1)
	go func() { served <- p.plane.Serve(accept, stop, p.ln) }()
	var drainTimer <-chan time.Time
	var drainEnd time.Time // when the drain begun ends; zero: none begun
	var predecessorDone chan struct{}
	if h := p.cfg.Handover; h != nil {
		// Serving on the shared sockets already: now the old process may
		// stop accepting. Its counters arrive once it has.
		totals, initialActive, cerr := h.Commit()
		if cerr != nil && !processAlive(h.PredecessorPID) {
			// It ended (crashed, or was killed) after this process asked:
			// nobody else serves, so this one does, from zero counts.
			p.log.Warn("previous process ended during the hand-over: serving without its counters", "predecessor", h.PredecessorPID, "err", cerr)
			cerr = nil
		}
		if cerr != nil {
			// The old one may still accept: two servers would each think
			// they own the pins. Drain this one; the old keeps serving.
			p.log.Error("hand-over not committed, draining this process", "predecessor", h.PredecessorPID, "err", cerr)
			p.accepting.Store(false)
			stopAccepting()
			drainTimer, drainEnd = time.After(p.cfg.Drain), time.Now().Add(p.cfg.Drain)
			p.closeHandoverFiles()
			p.control.Close()
			if p.cfg.OnServing != nil {
				p.cfg.OnServing(h.PredecessorPID, cerr)
			}
		} else {
			p.continueTotals(totals)
			if totals != nil {
				predecessorDone = make(chan struct{})
				go func() {
					defer close(predecessorDone)
					p.followPredecessor(h, totals, initialActive)
				}()
			}
			if p.maps != nil {
				if err := p.maps.PinConnectionMaps(); err != nil {
					p.log.Warn("cannot pin the connection maps", "err", err)
				}
			}
			p.log.Info("took over from the previous process", "predecessor", h.PredecessorPID)
		}
	}
	if p.admin != nil && drainTimer == nil {
		go p.serveAdmin()
	}
	if drainTimer == nil {
		go p.serveControl()
		state := "READY=1"
		predecessor := 0
		if p.cfg.Handover != nil {
			predecessor = p.cfg.Handover.PredecessorPID
			state = fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid())
		}
		if err := sdNotify(state); err != nil {
			p.log.Warn("cannot notify systemd", "err", err)
		}
		if p.cfg.OnServing != nil {
			p.cfg.OnServing(predecessor, nil)
		}
	}
	var err error
	stopSignalled := false
	var replied chan struct{} // closed once a successor has its answer
loop:
	for {
		select {
		case err = <-served:
			break loop
		case step := <-p.handoverReq:
			// Even when a stop signal began the drain already: the pins
			// are the successor's from now on.
			p.handOver()
			if drainTimer == nil {
				p.log.Info("handed over: draining, no new connections here", "successor", step.successor,
					"active", p.plane.Stats().Active, "drain", p.cfg.Drain)
				stopAccepting()
				drainTimer, drainEnd = time.After(p.cfg.Drain), time.Now().Add(p.cfg.Drain)
			}
			close(step.done)
			replied = step.replied
		case <-drainTimer:
			p.log.Warn("drain time over, closing the remaining connections", "active", p.plane.Stats().Active)
			stopAll()
		case sig := <-signals:
			switch {
			case sig == syscall.SIGHUP:
				p.reloadNow()
			case !stopSignalled:
				// The first stop signal drains, also in a process that is
				// draining after a hand-over already (`systemctl stop`
				// signals every process of the unit): its drain goes on.
				stopSignalled = true
				p.log.Info("draining: no new connections, waiting for established ones",
					"signal", sig.String(), "active", p.plane.Stats().Active, "drain", p.cfg.Drain)
				p.accepting.Store(false)
				p.closeHandoverFiles()
				p.control.Close()
				stopAccepting()
				if drainTimer == nil {
					drainTimer, drainEnd = time.After(p.cfg.Drain), time.Now().Add(p.cfg.Drain)
				}
			default:
				p.log.Warn("second stop signal, closing the remaining connections", "signal", sig.String(), "active", p.plane.Stats().Active)
				drainEnd = time.Time{} // stop now: wait for no predecessor either
				stopAll()
			}
		}
	}
	p.accepting.Store(false)
	stopAccepting()
	stopAll()
	p.closeHandoverFiles()
	p.control.Close()
	if p.admin != nil {
		p.admin.Close()
	}
	if p.closePlane != nil {
		if cerr := p.closePlane(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("release data plane: %w", cerr))
		}
	}
	if replied != nil {
		// This process may have nothing left to drain: it must still
		// answer the successor, which waits for the answer to serve on.
		select {
		case <-replied:
		case <-time.After(handoverWait):
		}
	}
	if predecessorDone != nil && !drainEnd.IsZero() {
		// A predecessor still draining sends its final counts here: wait
		// for them so the final counts this process passes on include
		// them. It began its drain before this one, so it ends before
		// this process's own drain would: the wait never outlasts it.
		select {
		case <-predecessorDone:
		case <-time.After(time.Until(drainEnd)):
		}
	}
	p.sendFinalTotals()
	p.log.Info("edgeproxy stopped")
	return err
}

// followPredecessor waits for the process that handed over to end. Its
// final counters continue this process's; if it died without them
// (SIGKILL during its drain), the connections it last reported are taken
// out of the shared live counts, or hard limits would stay lower until
// the next fresh start.
func (p *Proxy) followPredecessor(h *Handover, totals *handoverTotals, initialActive map[string]int64) {
	final, active := h.finalTotals(initialActive)
	if final != nil {
		p.continueTotals(final.since(totals))
		return
	}
	n := p.balancer.releaseShared(active)
	p.log.Warn("previous process ended without handing over its final counts (killed?): its connections no longer count against limits",
		"predecessor", h.PredecessorPID, "connections", n)
}

// processAlive says whether pid still runs: a zombie (ended, not yet
// reaped by its parent) does not.
func processAlive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// The state follows the command name in parentheses, which may
	// itself hold ") ".
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z' && stat[i+2] != 'X'
	}
	return true
}

// HandedOver says a successor took over from this process: what the two
// share (pins, the WireGuard interface) is the successor's now.
func (p *Proxy) HandedOver() bool { return p.balancer.handedOver.Load() }

// handOver stops this process's part in serving new clients once a
// successor serves: no more admin HTTP or control requests here (the
// successor answers on the same sockets), no writes to the shared backend
// table, the pins left to the successor. Established connections go on.
func (p *Proxy) handOver() {
	p.accepting.Store(false)
	if p.maps != nil {
		p.maps.HandedOver()
	}
	p.balancer.HandedOver()
	if p.admin != nil {
		p.admin.Close()
	}
	p.control.Close()
	p.closeHandoverFiles()
}

func (p *Proxy) closeHandoverFiles() {
	p.handoverMu.Lock()
	defer p.handoverMu.Unlock()
	p.handoverFiles.close()
}

// reloadNow applies the routing and geo databases as they are on disk.
func (p *Proxy) reloadNow() {
	p.onReload(p.store.Reload())
	if _, err := p.geo.Refresh(); err != nil {
		p.log.Warn("geo database reload failed, keeping the previous one", "path", p.cfg.GeoIPPath, "err", err)
	} else {
		p.log.Info("geo database reloaded on SIGHUP", "geoip", p.geo.Current().Kind())
	}
}

// ReloadRouting reads routing.db now and applies a changed table as a
// reload does, without waiting for the next poll: the etcd follower calls
// it after each write it commits.
func (p *Proxy) ReloadRouting() {
	if r := p.store.Reload(); r.Changed || r.Err != nil {
		p.onReload(r)
	}
}

// every calls f each period until ctx ends; a period <= 0 never calls it.
func every(ctx context.Context, period time.Duration, f func()) {
	if period <= 0 {
		return
	}
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

func (p *Proxy) refreshGeo() {
	if changed, err := p.geo.Refresh(); err != nil {
		p.log.Warn("geo database reload failed, keeping the previous one", "path", p.cfg.GeoIPPath, "err", err)
	} else if changed {
		p.log.Info("geo database reloaded", "path", p.cfg.GeoIPPath)
	}
}

func (p *Proxy) onReload(r routing.ReloadResult) {
	p.applying.Lock()
	defer p.applying.Unlock()
	for _, re := range r.RowErrors {
		p.log.Warn("routing row skipped", "err", re.Error())
	}
	p.reloads.record(r.Err)
	if r.Err != nil {
		p.log.Error("routing reload failed, keeping the last good table", "db", p.cfg.DBPath, "err", r.Err)
		return
	}
	if err := p.balancer.Refresh(); err != nil {
		p.log.Warn("cannot mirror the backend table into BPF", "err", err)
	}
	if p.cfg.OnTable != nil {
		// The current table, not r.Table: of two reloads racing, the one
		// applied last must not hand the overlay the older table.
		p.cfg.OnTable(p.store.Current())
	}
	p.log.Info("routing reloaded", "db", p.cfg.DBPath, "version", fmt.Sprintf("%016x", r.Table.Version), "backends", len(r.Table.Backends))
}

// reapplyTable hands the current table to OnTable even when nothing
// changed (every reload interval), so state outside the proxy that drifted
// (a WireGuard route an operator removed by hand) is put back.
func (p *Proxy) reapplyTable() { p.cfg.OnTable(p.store.Current()) }

func (p *Proxy) sweepBindings() {
	removed, err := p.balancer.SweepBindings()
	if err != nil {
		p.log.Warn("affinity sweep failed", "err", err)
		return
	}
	p.log.Debug("affinity swept", "removed", removed, "remaining", p.balancer.Bindings())
}

func (p *Proxy) onClose(s ConnSummary) {
	p.log.Debug("connection closed", "client", s.Client, "backend", s.Backend,
		"bytes_to_backend", s.BytesIn, "bytes_to_client", s.BytesOut, "duration", s.Duration, "end", s.End)
}

// RaiseFileLimit lifts the soft open-file limit to the hard one: each
// proxied connection holds two sockets (and, on the splice plane, a pipe
// of two while bytes are in flight).
func RaiseFileLimit(log *slog.Logger) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read open-file limit", "err", err)
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise open-file limit", "err", err)
		}
	}
	if lim.Cur < 65536 {
		log.Warn("open-file limit is low: each connection holds 2 descriptors (and a pipe of 2 while bytes are in flight: every direction on the splice plane, streaming ones on the sockmap plane)", "limit", lim.Cur)
	}
}
