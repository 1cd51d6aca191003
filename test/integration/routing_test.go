//go:build linux

package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// geoLab is a proxy with several client hosts whose subnets a test geo
// database maps to countries, and backends that greet with their ids.
type geoLab struct {
	proxy    *nettest.NS
	backend  *nettest.NS
	clients  map[string]*nettest.NS // country -> client host
	proxyIPs map[string]string      // country -> proxy address on that client's link
	geoPath  string
}

var labCountries = []string{"FR", "BR", "US", "JP"}

func newGeoLab(t *testing.T) *geoLab {
	t.Helper()
	nettest.RequireRoot(t)
	lab := &geoLab{
		proxy: nettest.NewNS(t, "prx"), backend: nettest.NewNS(t, "bak"),
		clients: map[string]*nettest.NS{}, proxyIPs: map[string]string{},
	}
	nettest.Link(t, lab.proxy, nettest.ProxyBackendIP+"/24", lab.backend, nettest.BackendIP+"/24")
	// Private, shared and documentation space resolves to no country
	// whatever the database says, so the lab's clients live in 11.91/16:
	// public space, reachable only inside these namespaces. The writer
	// still needs reserved networks for the IPv4-mapped aliases.
	writer, err := mmdbwriter.New(mmdbwriter.Options{DatabaseType: "GeoLite2-Country", RecordSize: 24, IncludeReservedNetworks: true})
	if err != nil {
		t.Fatal(err)
	}
	for i, cc := range labCountries {
		ns := nettest.NewNS(t, "c"+strings.ToLower(cc))
		proxyIP, clientIP := fmt.Sprintf("11.91.%d.1", i+1), fmt.Sprintf("11.91.%d.2", i+1)
		nettest.Link(t, ns, clientIP+"/24", lab.proxy, proxyIP+"/24")
		lab.clients[cc], lab.proxyIPs[cc] = ns, proxyIP
		_, subnet, _ := net.ParseCIDR(fmt.Sprintf("11.91.%d.0/24", i+1))
		if err := writer.Insert(subnet, mmdbtype.Map{"country": mmdbtype.Map{"iso_code": mmdbtype.String(cc)}}); err != nil {
			t.Fatal(err)
		}
	}
	lab.geoPath = filepath.Join(t.TempDir(), "lab.mmdb")
	f, err := os.Create(lab.geoPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writer.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return lab
}

// serveBackends starts a greeter per row, on the row's port.
func (lab *geoLab) serveBackends(t *testing.T, rows []backendRow) {
	for _, r := range rows {
		nettest.Serve(t, lab.backend, fmt.Sprintf("%s:%d", nettest.BackendIP, r.Port), nettest.Greeter(r.ID))
	}
}

func (lab *geoLab) start(t *testing.T, plane string, rows []backendRow, env ...string) *proxyProc {
	env = append([]string{"EDGEPROXY_GEOIP_PATH=" + lab.geoPath, "EDGEPROXY_REGION=sa", "EDGEPROXY_ADMIN_ADDR=127.0.0.1:9090"}, env...)
	return startProxy(t, lab.proxy, plane, rows, env...)
}

// connect dials the proxy from the country's client host and returns the
// connection and the id of the backend that greeted.
func (lab *geoLab) connect(t *testing.T, country string) (*net.TCPConn, string) {
	t.Helper()
	c, err := nettest.Dial(lab.clients[country], lab.proxyIPs[country]+":8080", 2*time.Second)
	if err != nil {
		t.Fatalf("dial from %s: %v", country, err)
	}
	line, err := nettest.ReadLine(c, 3*time.Second)
	if err != nil {
		c.Close()
		t.Fatalf("greeting for %s client: %v", country, err)
	}
	return c, strings.TrimPrefix(line, "hello from ")
}

func (lab *geoLab) reach(t *testing.T, country string) string {
	t.Helper()
	c, id := lab.connect(t, country)
	c.Close()
	return id
}

// metric reads one sample from the proxy's /metrics.
func (lab *geoLab) metric(t *testing.T, name string) float64 {
	t.Helper()
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nettest.Dial(lab.proxy, addr, 2*time.Second)
		},
	}}
	resp, err := client.Get("http://127.0.0.1:9090/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("metric %s missing from:\n%s", name, body)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

// mustBeRefused checks the proxy closes a client's connection at once: the
// reset may even beat the dial's own return.
func (lab *geoLab) mustBeRefused(t *testing.T, country string) {
	t.Helper()
	start := time.Now()
	c, err := nettest.Dial(lab.clients[country], lab.proxyIPs[country]+":8080", 2*time.Second)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("dial: %v", err)
		}
		return
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Read(make([]byte, 64))
	if n != 0 || isTimeout(err) || time.Since(start) > time.Second {
		t.Fatalf("connection not refused: read %d bytes, err %v after %s; want it closed at once", n, err, time.Since(start))
	}
}

func row(id, region, country string, port, weight, soft, hard int) backendRow {
	return backendRow{ID: id, Region: region, Country: country, Addr: nettest.BackendIP, Port: port, Healthy: true, Weight: weight, Soft: soft, Hard: hard}
}

func updateDB(t *testing.T, path, stmt string, args ...any) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(stmt, args...); err != nil {
		t.Fatalf("%s: %v", stmt, err)
	}
}

func TestGeoRouting(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{
		row("eu-fr", "eu", "FR", 9001, 1, 100, 0),
		row("eu-de", "eu", "DE", 9002, 1, 100, 0),
		row("sa-br", "sa", "BR", 9003, 1, 100, 0),
		row("us-us", "us", "US", 9004, 1, 100, 0),
	}
	lab.serveBackends(t, rows)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			lab.start(t, plane, rows)
			for country, want := range map[string]string{
				"FR": "eu-fr", // same country
				"BR": "sa-br",
				"US": "us-us",
				"JP": "sa-br", // ap has no backend: this POP's region (sa)
			} {
				if got := lab.reach(t, country); got != want {
					t.Errorf("client in %s reached %s, want %s", country, got, want)
				}
			}
		})
	}
}

func TestGeoRoutingSameRegionAfterReload(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("eu-fr", "eu", "FR", 9001, 1, 100, 0), row("eu-de", "eu", "DE", 9002, 1, 100, 0), row("sa-br", "sa", "BR", 9003, 1, 100, 0)}
	lab.serveBackends(t, rows)
	p := lab.start(t, "sockmap", rows)
	if got := lab.reach(t, "FR"); got != "eu-fr" {
		t.Fatalf("FR client reached %s, want eu-fr", got)
	}
	// Changed with another connection while the proxy runs, as an
	// operator's sqlite3 shell would: applied within a second.
	updateDB(t, p.DBPath, `UPDATE backends SET healthy = 0 WHERE id = 'eu-fr'`)
	deadline := time.Now().Add(time.Second + 200*time.Millisecond)
	for {
		got := lab.reach(t, "FR")
		if got == "eu-de" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("1.2s after marking eu-fr unhealthy the FR client still reaches %s, want eu-de (same region)", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestWeightedSpreadingUnderHeldConnections(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-light", "eu", "FR", 9001, 1, 100, 0), row("fr-heavy", "eu", "FR", 9002, 3, 100, 0)}
	lab.serveBackends(t, rows)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			// No affinity: every connection is scored on load alone.
			lab.start(t, plane, rows, "EDGEPROXY_BINDING_TTL_SECS=0")
			count := map[string]int{}
			for range 40 {
				c, id := lab.connect(t, "FR")
				defer c.Close()
				count[id]++
			}
			// score = active/soft/weight: weight 3 carries three times the load.
			if count["fr-light"] < 9 || count["fr-light"] > 11 || count["fr-heavy"] < 29 || count["fr-heavy"] > 31 {
				t.Fatalf("40 held connections spread %v, want about 10 on fr-light (weight 1) and 30 on fr-heavy (weight 3)", count)
			}
		})
	}
}

func TestHardLimitRefusesAtOnce(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-small", "eu", "FR", 9001, 1, 1, 3)}
	lab.serveBackends(t, rows)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			lab.start(t, plane, rows)
			var held []*net.TCPConn
			for range 3 {
				c, id := lab.connect(t, "FR")
				held = append(held, c)
				if id != "fr-small" {
					t.Fatalf("reached %s", id)
				}
			}
			lab.mustBeRefused(t, "FR")
			if got := lab.metric(t, `edgeproxy_rejected_connections_total{reason="all_at_hard_limit"}`); got != 1 {
				t.Fatalf("rejected all_at_hard_limit = %v, want 1", got)
			}
			// A slot frees when a connection ends.
			held[0].Close()
			time.Sleep(100 * time.Millisecond)
			c2, id := lab.connect(t, "FR")
			c2.Close()
			if id != "fr-small" {
				t.Fatalf("after a slot freed reached %q", id)
			}
			for _, h := range held[1:] {
				h.Close()
			}
		})
	}
}

func TestRejectReasons(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-a", "eu", "FR", 9001, 1, 1, 0)}
	lab.serveBackends(t, rows)
	p := lab.start(t, "sockmap", rows)
	refused := func() { t.Helper(); lab.mustBeRefused(t, "FR") }
	updateDB(t, p.DBPath, `UPDATE backends SET healthy = 0`)
	time.Sleep(time.Second)
	refused()
	if got := lab.metric(t, `edgeproxy_rejected_connections_total{reason="none_healthy"}`); got != 1 {
		t.Fatalf("none_healthy = %v, want 1", got)
	}
	updateDB(t, p.DBPath, `DELETE FROM backends`)
	time.Sleep(time.Second)
	refused()
	if got := lab.metric(t, `edgeproxy_rejected_connections_total{reason="table_empty"}`); got != 1 {
		t.Fatalf("table_empty = %v, want 1", got)
	}
}

// Two equal backends: without affinity a second connection from a client
// holding one would go to the idle backend; with it, it stays.
func TestAffinityStickyExpiresAndMovesOnUnhealthy(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-a", "eu", "FR", 9001, 1, 100, 0), row("fr-b", "eu", "FR", 9002, 1, 100, 0)}
	lab.serveBackends(t, rows)
	p := lab.start(t, "sockmap", rows, "EDGEPROXY_BINDING_TTL_SECS=2", "EDGEPROXY_BINDING_GC_INTERVAL_SECS=1")

	first, id := lab.connect(t, "FR")
	defer first.Close()
	if id != "fr-a" {
		t.Fatalf("first connection reached %s, want fr-a (tie broken by id)", id)
	}
	for i := range 5 {
		if got := lab.reach(t, "FR"); got != "fr-a" {
			t.Fatalf("connection %d with a binding to fr-a reached %s", i+2, got)
		}
	}
	if got := lab.metric(t, "edgeproxy_affinity_bindings"); got != 1 {
		t.Fatalf("affinity bindings = %v, want 1", got)
	}
	// Another client takes fr-b's place in the load... and the binding
	// expires 2s after its last use; the sweep runs every second.
	time.Sleep(3500 * time.Millisecond)
	if got := lab.metric(t, "edgeproxy_affinity_bindings"); got != 0 {
		t.Fatalf("affinity bindings after expiry = %v, want 0", got)
	}
	if got := lab.reach(t, "FR"); got != "fr-b" {
		t.Fatalf("after the binding expired (fr-a holds a connection) reached %s, want fr-b", got)
	}
	// Now bound to fr-b; make fr-b unhealthy: the client moves to fr-a.
	updateDB(t, p.DBPath, `UPDATE backends SET healthy = 0 WHERE id = 'fr-b'`)
	time.Sleep(time.Second)
	if got := lab.reach(t, "FR"); got != "fr-a" {
		t.Fatalf("bound backend unhealthy: reached %s, want fr-a", got)
	}
}

// Bindings live in a pinned map: a restarted proxy keeps them.
func TestAffinitySurvivesRestart(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("eu-a", "eu", "FR", 9001, 1, 100, 0), row("eu-b", "eu", "FR", 9002, 1, 100, 0)}
	lab.serveBackends(t, rows)
	p := lab.start(t, "sockmap", rows)
	// A US client holds eu-a (tie between idle backends goes to eu-a), so
	// the BR client is routed to, and bound to, eu-b.
	hold, id := lab.connect(t, "US")
	if id != "eu-a" {
		t.Fatalf("US client reached %s, want eu-a", id)
	}
	if got := lab.reach(t, "BR"); got != "eu-b" {
		t.Fatalf("BR client reached %s, want eu-b (eu-a busy)", got)
	}
	hold.Close()
	p.stop(t)
	p.start(t, lab.proxy, []string{"EDGEPROXY_GEOIP_PATH=" + lab.geoPath, "EDGEPROXY_REGION=sa", "EDGEPROXY_ADMIN_ADDR=127.0.0.1:9090"})
	// Both backends idle now: without its binding BR would get eu-a.
	if got := lab.reach(t, "BR"); got != "eu-b" {
		t.Fatalf("after a restart the BR client reached %s, want eu-b: its binding was lost", got)
	}
}

// Reloads applied while connections are open and new ones arrive drop
// none of them.
func TestHotReloadUnderTraffic(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-a", "eu", "FR", 9001, 1, 100, 0), row("fr-b", "eu", "FR", 9002, 1, 100, 0), row("fr-c", "eu", "FR", 9003, 1, 100, 0)}
	lab.serveBackends(t, rows)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			p := lab.start(t, plane, rows[:2], "EDGEPROXY_BINDING_TTL_SECS=0")
			stop := make(chan struct{})
			var wg sync.WaitGroup
			errs := make(chan error, 100)
			var ok [4]int
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var held []*net.TCPConn
					defer func() {
						for _, h := range held {
							h.Close()
						}
					}()
					for i := 0; i < 2000; i++ {
						select {
						case <-stop:
							return
						default:
						}
						c, err := nettest.Dial(lab.clients["FR"], lab.proxyIPs["FR"]+":8080", 2*time.Second)
						if err != nil {
							errs <- fmt.Errorf("worker %d dial %d: %w", w, i, err)
							return
						}
						if l, err := nettest.ReadLine(c, 3*time.Second); err != nil || !strings.HasPrefix(l, "hello from fr-") {
							errs <- fmt.Errorf("worker %d connection %d: greeting %q, %v", w, i, l, err)
							c.Close()
							return
						}
						held = append(held, c)
						// Every held connection must still echo.
						for j, h := range held {
							msg := fmt.Sprintf("w%d-%d-%d", w, i, j)
							fmt.Fprintln(h, msg)
							if got, err := nettest.ReadLine(h, 3*time.Second); err != nil || got != msg {
								errs <- fmt.Errorf("worker %d: held connection %d dropped during reloads: %q, %v", w, j, got, err)
								return
							}
						}
						if len(held) > 8 {
							held[0].Close()
							held = held[1:]
						}
						ok[w]++
					}
				}()
			}
			for i := range 12 {
				switch i % 3 {
				case 0:
					updateDB(t, p.DBPath, `INSERT OR REPLACE INTO backends VALUES ('fr-c','test','eu','FR',?,9003,1,1,100,0,0)`, nettest.BackendIP)
				case 1:
					updateDB(t, p.DBPath, `UPDATE backends SET weight = weight + 1`)
				case 2:
					updateDB(t, p.DBPath, `DELETE FROM backends WHERE id = 'fr-c'`)
				}
				time.Sleep(300 * time.Millisecond)
			}
			close(stop)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if got := lab.metric(t, `edgeproxy_routing_reloads_total{result="ok"}`); got < 6 {
				t.Errorf("routing reloads ok = %v, want at least 6 of the 12 changes seen", got)
			}
			t.Logf("%s: %v connections per worker during 12 reloads", plane, ok)
		})
	}
}

// A corrupt database keeps the last good table and counts an error.
func TestCorruptDatabaseKeepsLastGoodTable(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("fr-a", "eu", "FR", 9001, 1, 100, 0)}
	lab.serveBackends(t, rows)
	p := lab.start(t, "sockmap", rows)
	if err := os.WriteFile(p.DBPath, []byte(strings.Repeat("garbage ", 512)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if got := lab.metric(t, `edgeproxy_routing_reloads_total{result="error"}`); got < 1 {
		t.Fatalf("reload errors = %v, want at least 1", got)
	}
	if got := lab.reach(t, "FR"); got != "fr-a" {
		t.Fatalf("with a corrupt database the proxy routed to %q, want fr-a from the last good table", got)
	}
}
