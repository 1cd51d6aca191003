package userspace

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
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
	Panic    bool            `json:"panic"`
	MaxConns int64           `json:"max_conns"`
	Backends []BackendStatus `json:"backends"`
}

// BackendStatus is one backend of the current routing table.
type BackendStatus struct {
	ID             string `json:"id"`
	Region         string `json:"region"`
	Country        string `json:"country"`
	Address        string `json:"address"`
	Healthy        bool   `json:"healthy"`
	Weight         int    `json:"weight"`
	SoftLimit      int    `json:"soft_limit"`
	HardLimit      int    `json:"hard_limit"`
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
			Active: c.Active, Total: c.Total, ConnectErrors: c.ConnectErrs,
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

func (p *Proxy) newAdminServer() *http.Server {
	reg := prometheus.NewRegistry()
	p.collectorErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "edgeproxy_collector_errors_total",
		Help: "Errors while reading state for a metrics scrape or status.",
	})
	reg.MustRegister(p.collectorErrors, &collector{p: p})
	for _, c := range p.extraCollectors {
		reg.MustRegister(c)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: nil}))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(p.Status())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	return &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
}

func (p *Proxy) serveAdmin() {
	if err := p.admin.Serve(p.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
		p.log.Error("admin server stopped", "addr", p.cfg.AdminAddr, "err", err)
	}
}

// collector reads every counter at scrape time, so metrics never drift
// from the maps and counters they report.
type collector struct{ p *Proxy }

var (
	descConnections = prometheus.NewDesc("edgeproxy_connections_total", "Client connections routed to a backend.", []string{"backend"}, nil)
	descActive      = prometheus.NewDesc("edgeproxy_active_connections", "Connections currently open to a backend (slots reserved).", []string{"backend"}, nil)
	descRejected    = prometheus.NewDesc("edgeproxy_rejected_connections_total", "Clients closed at once because no backend was eligible.", []string{"reason"}, nil)
	descBytes       = prometheus.NewDesc("edgeproxy_bytes_total", "Payload bytes moved, by backend and direction.", []string{"backend", "direction"}, nil)
	descConnectErrs = prometheus.NewDesc("edgeproxy_backend_connect_errors_total", "Backend dials that failed or timed out.", []string{"backend"}, nil)
	descReloads     = prometheus.NewDesc("edgeproxy_routing_reloads_total", "Routing database reloads by result.", []string{"result"}, nil)
	descBindings    = prometheus.NewDesc("edgeproxy_affinity_bindings", "Client affinity bindings held.", nil, nil)
	descVerdicts    = prometheus.NewDesc("edgeproxy_verdicts_total", "Stream verdicts of the sockmap program by reason.", []string{"reason"}, nil)
	descBackendUp   = prometheus.NewDesc("edgeproxy_backend_up", "1 when the backend may take connections, 0 when checks or routing.db (healthy=0) hold it down.", []string{"backend"}, nil)
	descChecks      = prometheus.NewDesc("edgeproxy_health_checks_total", "Active health checks by result.", []string{"backend", "result"}, nil)
	descRetries     = prometheus.NewDesc("edgeproxy_connect_retries_total", "Connections retried on another backend after a dial to this one failed.", []string{"backend"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnections, descActive, descRejected, descBytes, descConnectErrs, descReloads, descBindings, descVerdicts, descBackendUp, descChecks, descRetries} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	p := c.p
	t := p.store.Current()
	for _, b := range p.backendCounters() {
		up := 0.0
		if i := t.Index(b.ID); i >= 0 && t.Backends[i].Healthy && !b.Down {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descBackendUp, prometheus.GaugeValue, up, b.ID)
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(b.ChecksOK), b.ID, "ok")
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(b.ChecksFailed), b.ID, "fail")
		ch <- prometheus.MustNewConstMetric(descRetries, prometheus.CounterValue, float64(b.Retries), b.ID)
		ch <- prometheus.MustNewConstMetric(descConnections, prometheus.CounterValue, float64(b.Total), b.ID)
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(b.Active), b.ID)
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(b.BytesIn), b.ID, "client_to_backend")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(b.BytesOut), b.ID, "backend_to_client")
		ch <- prometheus.MustNewConstMetric(descConnectErrs, prometheus.CounterValue, float64(b.ConnectErrs), b.ID)
	}
	for reason, n := range p.balancer.RejectedCounts() {
		ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(n), reason)
	}
	for result, n := range p.reloads.snapshot().results {
		ch <- prometheus.MustNewConstMetric(descReloads, prometheus.CounterValue, float64(n), result)
	}
	ch <- prometheus.MustNewConstMetric(descBindings, prometheus.GaugeValue, float64(p.balancer.Bindings()))
	for reason, n := range p.plane.Stats().Verdicts {
		ch <- prometheus.MustNewConstMetric(descVerdicts, prometheus.CounterValue, float64(n), reason)
	}
}
