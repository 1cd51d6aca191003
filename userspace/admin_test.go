package userspace

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// scrape serves a registry holding a collector of v (and extra collectors)
// through the admin metrics handler and returns the response.
func scrape(t *testing.T, v metricValues, extra ...prometheus.Collector) (status int, body string, errs float64) {
	t.Helper()
	reg := prometheus.NewRegistry()
	errCounter := prometheus.NewCounter(prometheus.CounterOpts{Name: "edgeproxy_collector_errors_total", Help: "test"})
	reg.MustRegister(errCounter, &collector{values: func() metricValues { return v }, errs: errCounter})
	for _, c := range extra {
		reg.MustRegister(c)
	}
	srv := httptest.NewServer(metricsHandler(reg, nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var m dto.Metric
	if err := errCounter.Write(&m); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b), m.GetCounter().GetValue()
}

// No backend id from routing.db can make /metrics fail.
func TestMetricsNeverFailOnBackendIDs(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ids      []string
		want     []string // lines the scrape must hold
		wantErrs float64
	}{
		{
			name: "valid ids are reported as they are",
			ids:  []string{"sa-br-1", "eu-fr-1"},
			want: []string{
				`edgeproxy_connections_total{backend="sa-br-1"} 7`,
				`edgeproxy_connections_total{backend="eu-fr-1"} 7`,
			},
		},
		{
			name: "an id that is not valid UTF-8 is reported with U+FFFD and counted as an error",
			ids:  []string{"ok-1", "bad-\xff\xfe-id"},
			want: []string{
				`edgeproxy_connections_total{backend="ok-1"} 7`,
				`edgeproxy_connections_total{backend="bad-` + "\uFFFD" + `-id"} 7`,
				`edgeproxy_bytes_total{backend="bad-` + "\uFFFD" + `-id",direction="backend_to_client"} 5`,
			},
			wantErrs: 1,
		},
		{
			name: "two bad ids that read the same keep the first series and count the second",
			ids:  []string{"x\xff", "x\xfe", "y"},
			want: []string{
				`edgeproxy_connections_total{backend="x` + "\uFFFD" + `"} 7`,
				`edgeproxy_connections_total{backend="y"} 7`,
			},
			wantErrs: 3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := metricValues{
				rejected: map[string]uint64{"table_empty": 2},
				reloads:  map[string]uint64{"ok": 1, "error": 0},
				bindings: 3,
				verdicts: map[string]uint64{"redirected": 9},
			}
			for i, id := range tc.ids {
				v.backends = append(v.backends, BackendCounters{ID: id, Index: uint32(i), Active: 1, Total: 7, BytesIn: 4, BytesOut: 5})
			}
			status, body, errs := scrape(t, v)
			if status != http.StatusOK {
				t.Fatalf("GET /metrics: HTTP %d, want 200; body:\n%s", status, body)
			}
			for _, line := range append(tc.want,
				`edgeproxy_rejected_connections_total{reason="table_empty"} 2`,
				`edgeproxy_affinity_bindings 3`,
				`edgeproxy_verdicts_total{reason="redirected"} 9`,
			) {
				if !strings.Contains(body, line+"\n") {
					t.Errorf("scrape lacks %q; body:\n%s", line, body)
				}
			}
			if errs != tc.wantErrs {
				t.Errorf("edgeproxy_collector_errors_total = %v, want %v", errs, tc.wantErrs)
			}
		})
	}
}

// brokenCollector sends one metric that cannot be encoded.
type brokenCollector struct{}

var descBroken = prometheus.NewDesc("edgeproxy_test_broken", "A metric that fails.", nil, nil)

func (brokenCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descBroken }
func (brokenCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.NewInvalidMetric(descBroken, errors.New("state unreadable"))
}

// One failing collector (a plane, the overlay) leaves the rest of the
// scrape intact.
func TestMetricsContinueOnError(t *testing.T) {
	status, body, _ := scrape(t, metricValues{bindings: 4}, brokenCollector{})
	if status != http.StatusOK {
		t.Fatalf("GET /metrics with a broken collector: HTTP %d, want 200; body:\n%s", status, body)
	}
	if !strings.Contains(body, "edgeproxy_affinity_bindings 4\n") {
		t.Fatalf("the good metrics are gone; body:\n%s", body)
	}
}

// The admin server sets every timeout.
func TestAdminServerHasTimeouts(t *testing.T) {
	srv := newAdminHTTPServer(http.NotFoundHandler(), defaultAdminLimits)
	for name, d := range map[string]time.Duration{
		"ReadHeaderTimeout": srv.ReadHeaderTimeout,
		"ReadTimeout":       srv.ReadTimeout,
		"WriteTimeout":      srv.WriteTimeout,
		"IdleTimeout":       srv.IdleTimeout,
	} {
		if d <= 0 {
			t.Errorf("%s is %v: a silent client could hold an admin slot forever", name, d)
		}
	}
	if defaultAdminLimits.MaxConns <= 0 {
		t.Errorf("MaxConns is %d: admin connections are unbounded", defaultAdminLimits.MaxConns)
	}
}

// With every admin slot held by a client that sends nothing, the next
// client waits in the backlog, and is served once the header timeout has
// closed the silent one.
func TestAdminConnectionsBoundedAndSilentClientsReaped(t *testing.T) {
	lim := adminLimits{MaxConns: 1, ReadHeader: 300 * time.Millisecond, Read: time.Second, Write: time.Second, Idle: time.Second}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	srv := newAdminHTTPServer(mux, lim)
	go srv.Serve(limitAdminListener(ln, lim))
	defer srv.Close()

	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	// The server cannot free the silent client's slot sooner than its
	// header timeout after this.
	start := time.Now()
	// Let the server accept it (and so take the only slot) before the
	// second client dials; the accept queue is FIFO in any case.
	time.Sleep(50 * time.Millisecond)

	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("second client never served: %v", err)
	}
	resp.Body.Close()
	waited := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("second client: HTTP %d", resp.StatusCode)
	}
	// A lower bound only: it cannot have been served before the silent
	// client's header timeout freed the slot, unless the bound leaked.
	if waited < lim.ReadHeader {
		t.Fatalf("second client served after %v, before the silent one's %v header timeout: the bound of %d did not hold", waited, lim.ReadHeader, lim.MaxConns)
	}
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if _, err := io.ReadAll(silent); errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("silent client not closed by the server after its header timeout: %v", err)
	}
	t.Logf("second client served %v after the silent one connected (header timeout %v)", waited, lim.ReadHeader)
}
