//go:build linux

package integration

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// badRow is a routing row the proxy must skip, and the words (any one,
// case-insensitive) its log line gives as the reason.
type badRow struct {
	row     backendRow
	marker  string // a part of the id that names the row in the log
	reasons []string
}

// TestBadRowsSkipped loads one good backend beside one bad row of each kind.
// Each bad row is skipped with its reason in the log, the good backend
// serves every client, and /metrics stays valid.
func TestBadRowsSkipped(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("good"))
		// The rows with a bad id point at a live server of their own: a
		// client that reaches it shows the row was used.
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("a-bad-row"))

		// Every row idle with equal scores: the tie goes to the lowest id,
		// so any "bad-" row left in the table would win over "good". Hard
		// limits keep a row that points at the proxy itself from
		// dialling itself without end.
		at := func(id, addr string, port int) backendRow {
			return backendRow{ID: id, Region: "sa", Country: "BR", Addr: addr, Port: port, Healthy: true, Weight: 1, Soft: 10, Hard: 50}
		}
		longID := "bad-long-" + strings.Repeat("x", 48-len("bad-long-"))
		limits := at("bad-limits", nettest.BackendIP, 9001)
		limits.Soft, limits.Hard = 100, 50
		bad := []badRow{
			{at("bad-utf8-\xff\xfe", nettest.BackendIP, 9001), "bad-utf8-", []string{"utf-8", "utf8"}},
			{at(longID, nettest.BackendIP, 9001), "bad-long-", []string{"47", "long", "bytes"}},
			{at("bad-unspec4", "0.0.0.0", 9001), "bad-unspec4", []string{"unspecified"}},
			{at("bad-unspec6", "::", 9001), "bad-unspec6", []string{"unspecified"}},
			{at("bad-mcast4", "224.0.0.1", 9001), "bad-mcast4", []string{"multicast"}},
			{at("bad-mcast6", "ff02::1", 9001), "bad-mcast6", []string{"multicast"}},
			{at("bad-self-ip", nettest.ProxyBackendIP, 8080), "bad-self-ip", []string{"listen", "itself", "own"}},
			{at("bad-self-lo", "127.0.0.1", 8080), "bad-self-lo", []string{"listen", "itself", "own"}},
			{limits, "bad-limits", []string{"hard_limit"}},
			{at("bad-ll", "fe80::1", 9001), "bad-ll", []string{"zone", "link-local"}},
		}
		if len(longID) != 48 {
			t.Fatalf("long id has %d bytes, want 48", len(longID))
		}
		rows := []backendRow{at("good", nettest.BackendIP, 9000)}
		for _, b := range bad {
			rows = append(rows, b.row)
		}
		p := startProxy(t, topo.Proxy, plane, rows, adminEnv,
			"EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_CONNECT_RETRIES=0", "EDGEPROXY_BINDING_TTL_SECS=0")

		// Each skip is logged with its reason.
		// The table loads before the start line; give a slow log 2s.
		var skipped []string
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			skipped = skipped[:0]
			for _, line := range strings.Split(p.logs.String(), "\n") {
				if strings.Contains(line, "routing row skipped") {
					skipped = append(skipped, line)
				}
			}
			all := !slices.ContainsFunc(bad, func(b badRow) bool {
				return !slices.ContainsFunc(skipped, func(l string) bool { return strings.Contains(l, b.marker) })
			})
			if all || time.Now().After(deadline) {
				break
			}
		}
		for _, b := range bad {
			i := slices.IndexFunc(skipped, func(l string) bool { return strings.Contains(l, b.marker) })
			if i < 0 {
				t.Errorf("row %q (wg_ip %s port %d, soft %d hard %d): no \"routing row skipped\" line", b.row.ID, b.row.Addr, b.row.Port, b.row.Soft, b.row.Hard)
				continue
			}
			lower := strings.ToLower(skipped[i])
			if !slices.ContainsFunc(b.reasons, func(w string) bool { return strings.Contains(lower, w) }) {
				t.Errorf("row %q skipped without a reason naming any of %q:\n%s", b.row.ID, b.reasons, skipped[i])
			}
		}

		if testing.Verbose() {
			t.Logf("skip lines:\n%s", strings.Join(skipped, "\n"))
		}

		// Only the good row is in the table, and it serves.
		st := proxyStatus(t, topo.Proxy)
		var ids []string
		for _, b := range st.Backends {
			ids = append(ids, fmt.Sprintf("%q", b.ID))
		}
		if len(ids) != 1 || ids[0] != `"good"` {
			t.Errorf("/status backends %s, want only \"good\"", strings.Join(ids, ", "))
		}
		for i := range 10 {
			a := tryGreeting(topo.Client, "", proxyAddr, 2*time.Second)
			if a.conn != nil {
				a.conn.Close()
			}
			if a.out != greeted || a.id != "good" {
				t.Errorf("client %d: %s; want the good backend", i, a)
				break
			}
		}

		// /metrics answers 200 with text a Prometheus server can parse,
		// and names no skipped row.
		code, body, err := adminGet(topo.Proxy, "/metrics")
		if err != nil || code != http.StatusOK {
			t.Fatalf("GET /metrics: HTTP %d, %v\n%s", code, err, body)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		if _, err := parser.TextToMetricFamilies(bytes.NewReader(body)); err != nil {
			t.Errorf("GET /metrics is not valid Prometheus text: %v", err)
		}
		var leaked []string
		for _, line := range strings.Split(string(body), "\n") {
			if strings.Contains(line, `backend="bad-`) {
				leaked = append(leaked, line)
			}
		}
		if len(leaked) > 0 {
			t.Errorf("GET /metrics has %d series of skipped rows, the first:\n%s", len(leaked), strings.Join(leaked[:min(5, len(leaked))], "\n"))
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("edgeproxy exited: %v", err)
		default:
		}
	})
}
