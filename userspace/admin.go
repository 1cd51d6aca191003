package userspace

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// reloadLog remembers the last routing reload and counts them by result.
type reloadLog struct {
	mu      sync.Mutex
	at      time.Time
	err     error
	results map[string]uint64 // "ok", "error"
	started bool
}

func (r *reloadLog) record(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.results == nil {
		r.results = map[string]uint64{"ok": 0, "error": 0}
	}
	r.at, r.err = time.Now(), err
	if !r.started {
		// The initial load is not a reload; it only sets the time.
		r.started = true
		return
	}
	if err != nil {
		r.results["error"]++
	} else {
		r.results["ok"]++
	}
}

// reloadSnapshot is a copy of the reload log.
type reloadSnapshot struct {
	at      time.Time
	err     error
	results map[string]uint64
}

func (r *reloadLog) snapshot() reloadSnapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	results := map[string]uint64{}
	for k, v := range r.results {
		results[k] = v
	}
	return reloadSnapshot{at: r.at, err: r.err, results: results}
}

// Status is what GET /status returns and `edgeproxy status` prints.
type Status struct {
	Region           string            `json:"region"`
	Dataplane        string            `json:"dataplane"`
	DataplaneReason  string            `json:"dataplane_reason"`
	RoutingVersion   string            `json:"routing_version"`
	LastReload       time.Time         `json:"last_reload"`
	LastReloadResult string            `json:"last_reload_result"`
	LastReloadError  string            `json:"last_reload_error,omitempty"`
	Bindings         int               `json:"bindings"`
	Active           int               `json:"active"`
	Rejected         map[string]uint64 `json:"rejected"`
	Verdicts         map[string]uint64 `json:"verdicts,omitempty"`
	// Panic is true while checks hold every backend down and routing
	// uses all of them anyway.
	Panic    bool  `json:"panic"`
	MaxConns int64 `json:"max_conns"`
	// Workers is the number of event loops; Accepted what each accepted.
	Workers  int             `json:"workers"`
	Accepted []uint64        `json:"accepted_per_worker,omitempty"`
	Backends []BackendStatus `json:"backends"`
	// Etcd is the follower of the fleet's etcd; absent when the POP
	// follows none.
	Etcd *EtcdStatus `json:"etcd,omitempty"`
}

// EtcdStatus is where the POP stands with the fleet's etcd.
type EtcdStatus struct {
	Endpoints []string `json:"endpoints"`
	Prefix    string   `json:"prefix"`
	// Connected is false while etcd is unreachable: routing goes on with
	// the local table.
	Connected bool `json:"connected"`
	// Revision is the last etcd revision written to routing.db, and
	// LastSync when.
	Revision  int64     `json:"revision"`
	LastSync  time.Time `json:"last_sync"`
	LastError string    `json:"last_error,omitempty"`
}

// BackendStatus is one backend of the current routing table.
type BackendStatus struct {
	ID        string `json:"id"`
	Region    string `json:"region"`
	Country   string `json:"country"`
	Address   string `json:"address"`
	Healthy   bool   `json:"healthy"`
	Weight    int    `json:"weight"`
	SoftLimit int    `json:"soft_limit"`
	HardLimit int    `json:"hard_limit"`
	// ProxyProtocol is the PROXY header version sent to the backend
	// (routing.db's proxy_protocol): 0 none, 1 or 2.
	ProxyProtocol  int    `json:"proxy_protocol"`
	Active         int64  `json:"active"`
	Total          uint64 `json:"total"`
	ConnectErrors  uint64 `json:"connect_errors"`
	BytesToBackend uint64 `json:"bytes_to_backend"`
	BytesToClient  uint64 `json:"bytes_to_client"`
	// State is up, down (checks or failed dials) or admin_down
	// (healthy=0 in routing.db, which always wins).
	State          HealthState `json:"state"`
	StateSince     time.Time   `json:"state_since"`
	LastError      string      `json:"last_error"`
	ConnectRetries uint64      `json:"connect_retries"`
}

// Status assembles the proxy's current state.
func (p *Proxy) Status() Status {
	t := p.store.Current()
	last := p.reloads.snapshot()
	at, err := last.at, last.err
	plane := p.plane.Stats()
	st := Status{
		Region:          p.cfg.Region,
		Dataplane:       p.plane.Name(),
		DataplaneReason: p.DataplaneReason,
		RoutingVersion:  fmt.Sprintf("%016x", t.Version),
		LastReload:      at,
		Active:          plane.Active,
		Verdicts:        plane.Verdicts,
		Rejected:        p.balancer.RejectedCounts(),
		Bindings:        p.balancer.Bindings(),
		Panic:           p.balancer.Panicking(),
		MaxConns:        p.admission.maxConns,
		Workers:         p.workers(),
		Accepted:        plane.Accepted,
	}
	if p.cfg.Etcd != nil {
		e := p.cfg.Etcd()
		st.Etcd = &e
	}
	st.LastReloadResult = "ok"
	if err != nil {
		st.LastReloadResult, st.LastReloadError = "error", err.Error()
	}
	counters := map[string]BackendCounters{}
	for _, c := range p.backendCounters() {
		counters[c.ID] = c
	}
	for _, b := range t.Backends {
		c := counters[b.ID]
		state := StateUp
		switch {
		case !b.Healthy:
			state = StateAdminDown
		case c.Down:
			state = StateDown
		}
		st.Backends = append(st.Backends, BackendStatus{
			ID: b.ID, Region: b.Region, Country: b.Country, Address: b.AddrPort().String(),
			Healthy: b.Healthy, Weight: b.Weight, SoftLimit: b.SoftLimit, HardLimit: b.HardLimit,
			ProxyProtocol: b.ProxyProtocol, Active: c.Active, Total: c.Total, ConnectErrors: c.ConnectErrs,
			BytesToBackend: c.BytesIn, BytesToClient: c.BytesOut,
			State: state, StateSince: c.Since, LastError: c.LastError, ConnectRetries: c.Retries,
		})
	}
	sort.Slice(st.Backends, func(i, j int) bool { return st.Backends[i].ID < st.Backends[j].ID })
	return st
}

// backendCounters adds the bytes the kernel redirected (sockmap plane) to
// the bytes userspace moved itself.
func (p *Proxy) backendCounters() []BackendCounters {
	counters := p.balancer.Counters()
	if kb, ok := p.plane.(kernelBytes); ok {
		for i := range counters {
			in, out, err := kb.KernelBytes(counters[i].Index)
			if err != nil {
				p.collectorErrors.Inc()
				continue
			}
			counters[i].BytesIn += in
			counters[i].BytesOut += out
		}
	}
	return counters
}

// kernelBytes is implemented by data planes whose bytes the kernel moves.
type kernelBytes interface {
	KernelBytes(backend uint32) (toBackend, toClient uint64, err error)
}

// adminLimits bound what admin clients may hold: every connection takes one
// of MaxConns slots, and the timeouts make sure a silent or slow client gives
// its slot back.
type adminLimits struct {
	MaxConns                      int
	ReadHeader, Read, Write, Idle time.Duration
}

// defaultAdminLimits fit a scraper and a few operators. Write is generous:
// /metrics of thousands of backends is a few MB.
var defaultAdminLimits = adminLimits{
	MaxConns:   64,
	ReadHeader: 5 * time.Second,
	Read:       10 * time.Second,
	Write:      30 * time.Second,
	Idle:       60 * time.Second,
}

func (p *Proxy) newAdminServer() *http.Server {
	reg := prometheus.NewRegistry()
	p.collectorErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "edgeproxy_collector_errors_total",
		Help: "Errors while reading state for a metrics scrape or status.",
	})
	reg.MustRegister(p.collectorErrors, &collector{values: p.metricValues, errs: p.collectorErrors})
	for _, c := range p.extraCollectors {
		reg.MustRegister(c)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metricsHandler(reg, p.log))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(p.Status())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	srv := newAdminHTTPServer(mux, defaultAdminLimits)
	if p.log != nil {
		// The server logs each failed accept (out of descriptors) as it
		// retries: one line per cause and period is enough.
		srv.ErrorLog = log.New(adminErrorWriter{newThrottledLog(p.log, 10*time.Second)}, "", 0)
	}
	return srv
}

// adminErrorWriter turns net/http's error lines into throttled warnings.
type adminErrorWriter struct{ warn *throttledLog }

func (w adminErrorWriter) Write(b []byte) (int, error) {
	line := strings.TrimSpace(string(b))
	key := line
	if i := strings.IndexAny(line, ";:"); i > 0 {
		key = line[:i] // "http: Accept error: ...; retrying in 5ms" varies after the cause
	}
	w.warn.Warn("admin:"+key, "admin server error", "err", line)
	return len(b), nil
}

// newAdminHTTPServer is the admin server with its timeouts; serve it on a
// listener wrapped by limitAdminListener.
func newAdminHTTPServer(h http.Handler, lim adminLimits) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.ReadHeader,
		ReadTimeout:       lim.Read,
		WriteTimeout:      lim.Write,
		IdleTimeout:       lim.Idle,
	}
}

// limitAdminListener accepts at most lim.MaxConns connections at once; the
// next waits in the listen backlog until one closes.
func limitAdminListener(ln net.Listener, lim adminLimits) net.Listener {
	return netutil.LimitListener(ln, lim.MaxConns)
}

// metricsHandler serves reg. A metric that fails is left out and logged;
// the rest of the scrape is still served, never an HTTP 500.
func metricsHandler(reg *prometheus.Registry, log *slog.Logger) http.Handler {
	opts := promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}
	if log != nil {
		opts.ErrorLog = promLogger{log}
	}
	return promhttp.HandlerFor(reg, opts)
}

// promLogger writes promhttp's errors through slog.
type promLogger struct{ log *slog.Logger }

func (l promLogger) Println(v ...any) {
	l.log.Warn("metrics scrape incomplete", "err", strings.TrimSpace(fmt.Sprintln(v...)))
}

func (p *Proxy) serveAdmin() {
	if err := p.admin.Serve(limitAdminListener(p.adminLn, defaultAdminLimits)); err != nil && !errors.Is(err, http.ErrServerClosed) {
		p.log.Error("admin server stopped", "addr", p.cfg.AdminAddr, "err", err)
	}
}

// collector reads every counter at scrape time, so metrics never drift
// from the maps and counters they report.
type collector struct {
	values func() metricValues
	errs   prometheus.Counter // edgeproxy_collector_errors_total
}

// metricValues is what one scrape reports, read from the proxy.
type metricValues struct {
	backends []BackendCounters
	rejected map[string]uint64
	// headerRefused counts refused PROXY headers by cause.
	headerRefused map[string]uint64
	reloads       map[string]uint64
	bindings      int
	verdicts      map[string]uint64
}

// metricValues reads the proxy's counters. The plane's Stats are counted
// in userspace or read from per-CPU arrays: no map walk per scrape.
func (p *Proxy) metricValues() metricValues {
	backends := p.backendCounters()
	t := p.store.Current()
	for i := range backends {
		b := &backends[i]
		j := t.Index(b.ID)
		b.Up = j >= 0 && t.Backends[j].Healthy && !b.Down
	}
	return metricValues{
		backends:      backends,
		rejected:      p.balancer.RejectedCounts(),
		headerRefused: p.headerRefusals.Counts(),
		reloads:       p.reloads.snapshot().results,
		bindings:      p.balancer.Bindings(),
		verdicts:      p.plane.Stats().Verdicts,
	}
}

var (
	descConnections   = prometheus.NewDesc("edgeproxy_connections_total", "Client connections routed to a backend.", []string{"backend"}, nil)
	descActive        = prometheus.NewDesc("edgeproxy_active_connections", "Connections currently open to a backend (slots reserved).", []string{"backend"}, nil)
	descRejected      = prometheus.NewDesc("edgeproxy_rejected_connections_total", "Clients closed at once, by reason: no eligible backend, a client or process limit, every dial failed.", []string{"reason"}, nil)
	descBytes         = prometheus.NewDesc("edgeproxy_bytes_total", "Payload bytes moved, by backend and direction.", []string{"backend", "direction"}, nil)
	descConnectErrs   = prometheus.NewDesc("edgeproxy_backend_connect_errors_total", "Backend dials that failed or timed out.", []string{"backend"}, nil)
	descReloads       = prometheus.NewDesc("edgeproxy_routing_reloads_total", "Routing database reloads by result.", []string{"result"}, nil)
	descBindings      = prometheus.NewDesc("edgeproxy_affinity_bindings", "Client affinity bindings held.", nil, nil)
	descVerdicts      = prometheus.NewDesc("edgeproxy_verdicts_total", "Stream verdicts of the sockmap program by reason.", []string{"reason"}, nil)
	descBackendUp     = prometheus.NewDesc("edgeproxy_backend_up", "1 when the backend may take connections, 0 when checks or routing.db (healthy=0) hold it down.", []string{"backend"}, nil)
	descChecks        = prometheus.NewDesc("edgeproxy_health_checks_total", "Active health checks by result.", []string{"backend", "result"}, nil)
	descRetries       = prometheus.NewDesc("edgeproxy_connect_retries_total", "Connections retried on another backend after a dial to this one failed.", []string{"backend"}, nil)
	descHeaderRefused = prometheus.NewDesc("edgeproxy_proxy_protocol_refused_total", "Connections closed because of their PROXY header, by cause (each also counted in edgeproxy_rejected_connections_total{reason=\"proxy_protocol\"}).", []string{"cause"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnections, descActive, descRejected, descBytes, descConnectErrs, descReloads, descBindings, descVerdicts, descBackendUp, descChecks, descRetries, descHeaderRefused} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	emitMetrics(ch, c.values(), c.errs)
}

// emitMetrics sends v as metrics and never panics: a series that cannot be
// built is left out and counted in errs. A backend id that is not valid
// UTF-8 (routing.db holds any bytes) is reported with U+FFFD in place of
// the bad bytes, and counted; two ids that end up with the same label keep
// only the first series, and the second is counted.
func emitMetrics(ch chan<- prometheus.Metric, v metricValues, errs prometheus.Counter) {
	emit := func(desc *prometheus.Desc, typ prometheus.ValueType, value float64, labels ...string) {
		m, err := prometheus.NewConstMetric(desc, typ, value, labels...)
		if err != nil {
			errs.Inc()
			return
		}
		ch <- m
	}
	seen := make(map[string]struct{}, len(v.backends))
	for _, b := range v.backends {
		id := b.ID
		if !utf8.ValidString(id) {
			errs.Inc()
			id = strings.ToValidUTF8(id, "\uFFFD")
		}
		if _, dup := seen[id]; dup {
			errs.Inc()
			continue
		}
		seen[id] = struct{}{}
		emit(descConnections, prometheus.CounterValue, float64(b.Total), id)
		emit(descActive, prometheus.GaugeValue, float64(b.Active), id)
		emit(descBytes, prometheus.CounterValue, float64(b.BytesIn), id, "client_to_backend")
		emit(descBytes, prometheus.CounterValue, float64(b.BytesOut), id, "backend_to_client")
		emit(descConnectErrs, prometheus.CounterValue, float64(b.ConnectErrs), id)
		up := 0.0
		if b.Up {
			up = 1
		}
		emit(descBackendUp, prometheus.GaugeValue, up, id)
		emit(descChecks, prometheus.CounterValue, float64(b.ChecksOK), id, "ok")
		emit(descChecks, prometheus.CounterValue, float64(b.ChecksFailed), id, "fail")
		emit(descRetries, prometheus.CounterValue, float64(b.Retries), id)
	}
	for reason, n := range v.rejected {
		emit(descRejected, prometheus.CounterValue, float64(n), reason)
	}
	for cause, n := range v.headerRefused {
		emit(descHeaderRefused, prometheus.CounterValue, float64(n), cause)
	}
	for result, n := range v.reloads {
		emit(descReloads, prometheus.CounterValue, float64(n), result)
	}
	emit(descBindings, prometheus.GaugeValue, float64(v.bindings))
	for reason, n := range v.verdicts {
		emit(descVerdicts, prometheus.CounterValue, float64(n), reason)
	}
}
