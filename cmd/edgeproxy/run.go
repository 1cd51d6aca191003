package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func newRunCommand(e env) *cobra.Command {
	var given runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Serve: accept clients, route them, splice them to backends",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) (runErr error) {
			report, err := openUpgradeReport(e)
			if err != nil {
				return err
			}
			served := false
			// Until it serves, a process started by `edgeproxy upgrade`
			// reports why it stopped; the old process keeps serving.
			defer func() {
				if report != nil && !served {
					report.failed(runErr)
				}
			}()
			cfg, debug, err := given.resolveConfig(e, cmd.Flags())
			if err != nil {
				return err
			}

			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			// Lines go out through a queue: a slow reader of stderr must
			// never stall the event loop that logs.
			logOut := userspace.NewAsyncWriter(os.Stderr, 4096)
			defer logOut.Close()
			log := slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: level}))
			userspace.RaiseFileLimit(log)
			// With etcd, its full load is written into routing.db before
			// the overlay and the proxy read it.
			fl, err := startFleet(e, cfg.DBPath, log)
			if err != nil {
				return err
			}
			defer fl.Close()
			if fl.Collector != nil {
				cfg.Collectors = append(cfg.Collectors, fl.Collector)
			}
			cfg.Etcd = fl.Status
			// The overlay comes up before the proxy so backends behind it
			// answer from the first connection, and goes down last. It
			// follows the pops table through the routing store's watcher.
			ov, err := startOverlay(e, cfg.DBPath, log)
			if err != nil {
				return err
			}
			closeOverlay := ov.Close
			defer func() { closeOverlay() }()
			cfg.LoadOptions, cfg.OnTable = ov.LoadOptions, ov.OnTable
			if ov.Collector != nil {
				cfg.Collectors = append(cfg.Collectors, ov.Collector)
			}
			if err := takeOver(report, &cfg); err != nil {
				return err
			}
			if report != nil {
				cfg.OnServing = func(predecessor int, err error) {
					served = true
					if err != nil {
						report.failed(fmt.Errorf("hand-over not committed: %w", err))
						return
					}
					report.ready(predecessor)
				}
			}
			proxy, err := userspace.New(cfg, log)
			if err != nil {
				if cfg.Handover != nil {
					cfg.Handover.Abort(err)
				}
				return err
			}
			fl.Follow(proxy.ReloadRouting)
			signals := make(chan os.Signal, 4)
			signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
			defer signal.Stop(signals)
			err = proxy.Run(signals)
			if proxy.HandedOver() && ov.On {
				// The successor adopted the interface: taking it down
				// now would cut its overlay.
				closeOverlay = func() {}
			}
			// The follower stops before the overlay closes: a change it
			// applied now would reach a mesh already gone.
			fl.Close()
			return err
		},
	}
	given.register(cmd.Flags())
	return cmd
}

// runFlags are the values `edgeproxy run`'s flags were given; a flag not
// given keeps its zero value and resolveConfig takes the variable instead.
type runFlags struct {
	cfg                                               userspace.Config
	reloadSecs, ttlSecs, gcSecs, connectMS, drainSecs int
	debug                                             bool
	proxyProtocolFrom                                 string
	lim                                               limitSettings
}

func (r *runFlags) register(f *pflag.FlagSet) {
	f.StringVar(&r.cfg.ListenAddr, "listen", "", "TCP listen address (EDGEPROXY_LISTEN_ADDR, default 0.0.0.0:8080)")
	f.StringVar(&r.cfg.DBPath, "db", "", "SQLite routing database (EDGEPROXY_DB_PATH, default routing.db)")
	f.StringVar(&r.cfg.Region, "region", "", "this POP's region (EDGEPROXY_REGION, default sa)")
	f.StringVar(&r.cfg.GeoIPPath, "geoip", "", "geo database .mmdb; empty: embedded (EDGEPROXY_GEOIP_PATH)")
	f.StringVar(&r.cfg.Dataplane, "dataplane", "", "auto, sockmap or splice (EDGEPROXY_DATAPLANE, default auto)")
	f.StringVar(&r.cfg.AdminAddr, "admin", "", "admin HTTP address; empty disables (EDGEPROXY_ADMIN_ADDR, default 127.0.0.1:9090)")
	f.StringVar(&r.cfg.PinPath, "bpf-pin-path", "", "where BPF maps are pinned (EDGEPROXY_BPF_PIN_PATH, default "+loader.DefaultPinPath+")")
	decimalIntVar(f, &r.reloadSecs, "db-reload-secs", 0, "longest time before a changed database is applied (EDGEPROXY_DB_RELOAD_SECS, default 5)")
	decimalIntVar(f, &r.ttlSecs, "binding-ttl-secs", 0, "affinity lifetime since last use (EDGEPROXY_BINDING_TTL_SECS, default 600)")
	decimalIntVar(f, &r.gcSecs, "binding-gc-interval-secs", 0, "affinity expiry sweep (EDGEPROXY_BINDING_GC_INTERVAL_SECS, default 60)")
	decimalIntVar(f, &r.connectMS, "connect-timeout-ms", 0, "backend dial timeout (EDGEPROXY_CONNECT_TIMEOUT_MS, default 2000)")
	decimalIntVar(f, &r.drainSecs, "drain-secs", 0, "on SIGTERM, how long established connections may finish (EDGEPROXY_DRAIN_SECS, default 30)")
	f.StringVar(&r.proxyProtocolFrom, "proxy-protocol-from", "", "comma-separated CIDRs whose connections must start with a PROXY v1/v2 header (EDGEPROXY_PROXY_PROTOCOL_FROM, default none)")
	f.BoolVar(&r.debug, "debug", false, "debug logging (DEBUG)")
	r.lim.flags(f)
}

// resolveConfig turns the flags given and the environment into the
// proxy's settings, with no side effect: a flag wins over its variable, an
// unset flag takes the variable, else the contract's default. A value out
// of range or not a number is an error naming the flag or variable.
func (r runFlags) resolveConfig(e env, flags *pflag.FlagSet) (cfg userspace.Config, debug bool, err error) {
	cfg, debug, lim, proxyProtocolFrom := r.cfg, r.debug, r.lim, r.proxyProtocolFrom
	reloadSecs, ttlSecs, gcSecs, connectMS, drainSecs := r.reloadSecs, r.ttlSecs, r.gcSecs, r.connectMS, r.drainSecs
	// A flag wins over its variable; an unset flag takes the
	// variable, else the contract's default.
	// Each duration has a ceiling: time.Duration holds about 292 years,
	// and a larger number of seconds would wrap to a negative period
	// instead of being refused.
	durations := []struct {
		flag, name  string
		def, lo, hi int
		val         *int
	}{
		{"db-reload-secs", "EDGEPROXY_DB_RELOAD_SECS", 5, 0, day, &reloadSecs},
		{"binding-ttl-secs", "EDGEPROXY_BINDING_TTL_SECS", 600, 0, 30 * day, &ttlSecs},
		{"binding-gc-interval-secs", "EDGEPROXY_BINDING_GC_INTERVAL_SECS", 60, 0, day, &gcSecs},
		{"connect-timeout-ms", "EDGEPROXY_CONNECT_TIMEOUT_MS", 2000, 1, 600_000, &connectMS},
		{"drain-secs", "EDGEPROXY_DRAIN_SECS", 30, 0, day, &drainSecs},
	}
	for _, d := range durations {
		if flags.Changed(d.flag) {
			if *d.val < d.lo || *d.val > d.hi {
				return cfg, false, fmt.Errorf("--%s=%d: want a whole number from %d to %d", d.flag, *d.val, d.lo, d.hi)
			}
			continue
		}
		v, err := e.intIn(d.name, d.def, d.lo, d.hi)
		if err != nil {
			return cfg, false, err
		}
		*d.val = v
	}
	strs := []struct {
		flag, name, def string
		val             *string
	}{
		{"listen", "EDGEPROXY_LISTEN_ADDR", "0.0.0.0:8080", &cfg.ListenAddr},
		{"db", "EDGEPROXY_DB_PATH", "routing.db", &cfg.DBPath},
		{"region", "EDGEPROXY_REGION", "sa", &cfg.Region},
		{"geoip", "EDGEPROXY_GEOIP_PATH", "", &cfg.GeoIPPath},
		{"dataplane", "EDGEPROXY_DATAPLANE", "auto", &cfg.Dataplane},
		{"admin", "EDGEPROXY_ADMIN_ADDR", "127.0.0.1:9090", &cfg.AdminAddr},
		{"bpf-pin-path", "EDGEPROXY_BPF_PIN_PATH", loader.DefaultPinPath, &cfg.PinPath},
		{"proxy-protocol-from", "EDGEPROXY_PROXY_PROTOCOL_FROM", "", &proxyProtocolFrom},
	}
	for _, s := range strs {
		if !flags.Changed(s.flag) {
			*s.val = e.str(s.name, s.def)
		}
	}
	if !flags.Changed("debug") {
		debug = e.str("DEBUG", "") != ""
	}
	if err := checkRunStrings(cfg, flags); err != nil {
		return cfg, false, err
	}
	if err := lim.resolve(e, flags); err != nil {
		return cfg, false, err
	}
	lim.apply(&cfg)
	if cfg.ProxyProtocolFrom, err = userspace.ParseTrustedUpstreams(proxyProtocolFrom); err != nil {
		if flags.Changed("proxy-protocol-from") {
			return cfg, false, fmt.Errorf("--proxy-protocol-from: %w", err)
		}
		return cfg, false, fmt.Errorf("EDGEPROXY_PROXY_PROTOCOL_FROM: %w", err)
	}
	cfg.DBReload = secs(reloadSecs)
	cfg.BindingTTL = secs(ttlSecs)
	cfg.BindingGC = secs(gcSecs)
	cfg.ConnectTimeout = millis(connectMS)
	cfg.Drain = secs(drainSecs)
	return cfg, debug, nil
}

// checkRunStrings refuses, before anything opens, the text settings that
// would otherwise fail later with a message that does not name them.
func checkRunStrings(cfg userspace.Config, flags *pflag.FlagSet) error {
	source := func(flag, name string) string {
		if flags.Changed(flag) {
			return "--" + flag
		}
		return name
	}
	switch cfg.Dataplane {
	case "auto", "sockmap", "splice":
	default:
		return fmt.Errorf("%s=%q: want auto, sockmap or splice", source("dataplane", "EDGEPROXY_DATAPLANE"), cfg.Dataplane)
	}
	if err := checkHostPort(cfg.ListenAddr); err != nil {
		return fmt.Errorf("%s=%q: %w", source("listen", "EDGEPROXY_LISTEN_ADDR"), cfg.ListenAddr, err)
	}
	if cfg.AdminAddr != "" {
		if err := checkHostPort(cfg.AdminAddr); err != nil {
			return fmt.Errorf("%s=%q: %w (empty disables the admin server)", source("admin", "EDGEPROXY_ADMIN_ADDR"), cfg.AdminAddr, err)
		}
	}
	if cfg.DBPath == "" {
		return fmt.Errorf("%s is empty: want the routing database's path", source("db", "EDGEPROXY_DB_PATH"))
	}
	if cfg.PinPath == "" {
		return fmt.Errorf("%s is empty: want a directory on bpffs", source("bpf-pin-path", "EDGEPROXY_BPF_PIN_PATH"))
	}
	return nil
}

// checkHostPort accepts what the listener takes: host:port or :port with
// a numeric port.
func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("want host:port, e.g. 0.0.0.0:8080")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("port %q: want a number from 0 to 65535", port)
	}
	return nil
}

// limitSettings are the health, retry, limit and timeout settings: whole
// numbers, each with a flag, a variable, a default and a range. A value
// out of range is refused at start.
type limitSettings struct {
	healthIntervalSecs, healthTimeoutMS, healthFall, healthRise int
	connectRetries, clientMaxConns, clientRate, maxConns        int
	keepaliveSecs, idleTimeoutSecs, maxBufferedMB, stallSecs    int
	workers, proxyProtocolTimeoutMS                             int
}

type intSetting struct {
	flag, name, help string
	def, lo, hi      int
	val              *int
}

// Defaults, and why:
//   - client max conns 1024: one address may not take every slot, yet a
//     carrier-grade NAT address serving hundreds of users, each with a few
//     connections, stays below it (a tenth of the default process cap at
//     a 20,000 descriptor limit).
//   - client rate 0 (off): a NAT address or a load test legitimately opens
//     hundreds of connections a second; only the operator knows the mix.
//   - max buffered 64 MiB: what a 1 GiB host can spare for queues in
//     front of slow readers, and one bulk stream still gets 32 MiB.
func (l *limitSettings) table() []intSetting {
	return []intSetting{
		{"health-interval-secs", "EDGEPROXY_HEALTH_INTERVAL_SECS", "active TCP check period; 0 disables checks", 5, 0, day, &l.healthIntervalSecs},
		{"health-timeout-ms", "EDGEPROXY_HEALTH_TIMEOUT_MS", "one check's connect timeout", 1000, 1, 60000, &l.healthTimeoutMS},
		{"health-fall", "EDGEPROXY_HEALTH_FALL", "failures in a row that mark a backend down", 3, 1, 1000, &l.healthFall},
		{"health-rise", "EDGEPROXY_HEALTH_RISE", "successes in a row that mark a backend up", 2, 1, 1000, &l.healthRise},
		{"connect-retries", "EDGEPROXY_CONNECT_RETRIES", "further backends tried after a failed dial", 2, 0, 16, &l.connectRetries},
		{"client-max-conns", "EDGEPROXY_CLIENT_MAX_CONNS", "concurrent connections per client address; 0 disables", 1024, 0, 10_000_000, &l.clientMaxConns},
		{"client-rate", "EDGEPROXY_CLIENT_RATE", "new connections per second per client address; 0 disables", 0, 0, 10_000_000, &l.clientRate},
		{"max-conns", "EDGEPROXY_MAX_CONNS", "connections for the whole process; 0: derived from the open-file limit", 0, 0, 100_000_000, &l.maxConns},
		{"keepalive-secs", "EDGEPROXY_KEEPALIVE_SECS", "TCP keepalive idle time on both sockets; 0 disables", 60, 0, day, &l.keepaliveSecs},
		{"idle-timeout-secs", "EDGEPROXY_IDLE_TIMEOUT_SECS", "close a connection idle both ways this long; 0 disables", 0, 0, 30 * day, &l.idleTimeoutSecs},
		{"max-buffered-mb", "EDGEPROXY_MAX_BUFFERED_MB", "MiB all connections may park in kernel queues before directions pause", 64, 1, 1 << 20, &l.maxBufferedMB},
		{"stall-timeout-secs", "EDGEPROXY_STALL_TIMEOUT_SECS", "reset a direction that made no progress this long; 0 disables", 300, 0, 30 * day, &l.stallSecs},
		{"workers", "EDGEPROXY_WORKERS", "event loops of the data plane (sockmap or splice); 0: one per CPU the process may run on", 0, 0, 1024, &l.workers},
		{"proxy-protocol-timeout-ms", "EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS", "longest wait for a trusted upstream's PROXY header", 3000, 1, 600_000, &l.proxyProtocolTimeoutMS},
	}
}

func (l *limitSettings) flags(f *pflag.FlagSet) {
	for _, s := range l.table() {
		decimalIntVar(f, s.val, s.flag, s.def, fmt.Sprintf("%s (%s, default %d)", s.help, s.name, s.def))
	}
}

// resolve takes each setting from its flag when given, else from its
// variable, else the default, and checks the range.
func (l *limitSettings) resolve(e env, flags *pflag.FlagSet) error {
	for _, s := range l.table() {
		if flags.Changed(s.flag) {
			if *s.val < s.lo || *s.val > s.hi {
				return fmt.Errorf("--%s=%d: want a whole number from %d to %d", s.flag, *s.val, s.lo, s.hi)
			}
			continue
		}
		v, err := e.intIn(s.name, s.def, s.lo, s.hi)
		if err != nil {
			return err
		}
		*s.val = v
	}
	if l.healthIntervalSecs > 0 && l.healthTimeoutMS > l.healthIntervalSecs*1000 {
		return fmt.Errorf("EDGEPROXY_HEALTH_TIMEOUT_MS=%d: longer than EDGEPROXY_HEALTH_INTERVAL_SECS=%d, checks would overlap", l.healthTimeoutMS, l.healthIntervalSecs)
	}
	return nil
}

func (l *limitSettings) apply(cfg *userspace.Config) {
	cfg.Health = userspace.HealthConfig{
		Interval: secs(l.healthIntervalSecs), Timeout: millis(l.healthTimeoutMS),
		Fall: l.healthFall, Rise: l.healthRise, Workers: healthWorkers,
	}
	cfg.ConnectRetries = l.connectRetries
	cfg.ClientMaxConns = l.clientMaxConns
	cfg.ClientRate = float64(l.clientRate)
	cfg.MaxConns = l.maxConns
	cfg.Keepalive = secs(l.keepaliveSecs)
	cfg.IdleTimeout = secs(l.idleTimeoutSecs)
	cfg.MaxBufferedMB = l.maxBufferedMB
	cfg.StallTimeout = secs(l.stallSecs)
	cfg.Workers = l.workers
	cfg.ProxyProtocolTimeout = millis(l.proxyProtocolTimeoutMS)
}

// day is the ceiling, in seconds, of the settings counted in seconds that
// have no natural one.
const day = 86400

// healthWorkers bounds the health probes in flight at once.
const healthWorkers = 16
