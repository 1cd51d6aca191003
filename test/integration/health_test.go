//go:build linux

package integration

import (
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// healthEnv runs active checks every interval seconds, fall failures to mark
// a backend down, rise successes to mark it up again.
func healthEnv(interval, fall, rise int) []string {
	return []string{
		fmt.Sprintf("EDGEPROXY_HEALTH_INTERVAL_SECS=%d", interval),
		fmt.Sprintf("EDGEPROXY_HEALTH_FALL=%d", fall),
		fmt.Sprintf("EDGEPROXY_HEALTH_RISE=%d", rise),
		"EDGEPROXY_HEALTH_TIMEOUT_MS=500",
	}
}

// loadResult is one short request/response connection of a load worker.
type loadResult struct {
	worker, seq int
	start       time.Time
	id          string // the backend that greeted; empty if none did
	err         error
}

// TestBackendKilledUnderLoad kills one of two backends while clients open
// short connections at a steady pace. Only connections that were already
// open on the killed backend may fail: a new connection that the proxy sends
// to the dead port is retried on the other one. The active checks mark the
// killed backend down within fall x interval.
func TestBackendKilledUnderLoad(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b1"))
		victim := nettest.Serve(t, topo.Backend, nettest.BackendIP+":9002", nettest.Greeter("b2"))
		const interval, fall = 1, 2
		env := append(healthEnv(interval, fall, 2), adminEnv, "EDGEPROXY_BINDING_TTL_SECS=0")
		startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9001), backendAt("b2", 9002)}, env...)
		waitUntil(t, 3*time.Second, "both backends up before the load", func() (bool, string) {
			st := proxyStatus(t, topo.Proxy)
			b1, _ := st.backend("b1")
			b2, _ := st.backend("b2")
			return b1.State == "up" && b2.State == "up", st.states()
		})

		var (
			mu      sync.Mutex
			results []loadResult
			wg      sync.WaitGroup
		)
		stop := make(chan struct{})
		deadline := time.Now().Add(20 * time.Second)
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 3000 {
					select {
					case <-stop:
						return
					default:
					}
					if time.Now().After(deadline) {
						return
					}
					r := loadResult{worker: w, seq: i, start: time.Now()}
					r.id, r.err = pingPong(topo.Client, fmt.Sprintf("w%d-%d", w, i))
					mu.Lock()
					results = append(results, r)
					mu.Unlock()
					time.Sleep(10 * time.Millisecond)
				}
			}()
		}
		stopLoad := func() {
			select {
			case <-stop:
			default:
				close(stop)
			}
			wg.Wait()
		}
		defer stopLoad()

		time.Sleep(1500 * time.Millisecond)
		mu.Lock()
		before := map[string]int{}
		for _, r := range results {
			before[r.id]++
		}
		mu.Unlock()
		if before["b1"] == 0 || before["b2"] == 0 {
			t.Fatalf("before the kill the load reached %v; want both b1 and b2", before)
		}
		killAt := time.Now()
		victim.Close()

		limit := time.Duration(fall*interval)*time.Second + 2*time.Second
		took := waitUntil(t, limit, "killed backend b2 marked down", func() (bool, string) {
			st := proxyStatus(t, topo.Proxy)
			b2, _ := st.backend("b2")
			return b2.State == "down", st.states()
		})
		t.Logf("%s: b2 down %s after the kill", plane, took.Round(10*time.Millisecond))
		// Keep the load on the survivor a while longer.
		time.Sleep(time.Second)
		stopLoad()

		st := proxyStatus(t, topo.Proxy)
		b1, _ := st.backend("b1")
		b2, _ := st.backend("b2")
		if b1.State != "up" {
			t.Errorf("survivor b1 state %q, want up: %s", b1.State, st.states())
		}
		if b2.LastError == "" {
			t.Errorf("killed b2 has no last_error: %s", st.states())
		}
		if since, err := time.Parse(time.RFC3339, b2.StateSince); err != nil {
			t.Errorf("b2 state_since %q is not an RFC 3339 time: %v", b2.StateSince, err)
		} else if since.Before(killAt.Add(-time.Second)) {
			t.Errorf("b2 state_since %s is before the kill at %s", since, killAt.Format(time.RFC3339Nano))
		}
		m := scrape(t, topo.Proxy)
		for series, want := range map[string]float64{
			`edgeproxy_backend_up{backend="b1"}`: 1,
			`edgeproxy_backend_up{backend="b2"}`: 0,
		} {
			if got, ok := m.get(series); !ok || got != want {
				t.Errorf("%s = %v (present %v), want %v", series, got, ok, want)
			}
		}
		if got, _ := m.get(`edgeproxy_health_checks_total{backend="b2",result="fail"}`); got < 1 {
			t.Errorf(`edgeproxy_health_checks_total{backend="b2",result="fail"} = %v, want >= 1`, got)
		}
		if got, _ := m.get(`edgeproxy_health_checks_total{backend="b1",result="ok"}`); got < 1 {
			t.Errorf(`edgeproxy_health_checks_total{backend="b1",result="ok"} = %v, want >= 1`, got)
		}

		// Only connections begun before the kill and not greeted by the
		// survivor may have failed.
		var bad []string
		var after, allowed int
		for _, r := range results {
			if !r.start.Before(killAt) {
				after++
			}
			if r.err == nil {
				continue
			}
			if r.start.Before(killAt) && r.id != "b1" {
				allowed++
				continue
			}
			bad = append(bad, fmt.Sprintf("worker %d connection %d begun %s after the kill (greeted by %q): %v",
				r.worker, r.seq, r.start.Sub(killAt).Round(time.Millisecond), r.id, r.err))
		}
		t.Logf("%s: %d connections, %d begun after the kill, %d failures allowed (open on b2 at the kill)", plane, len(results), after, allowed)
		if after < 20 {
			t.Errorf("only %d connections begun after the kill; the load stalled", after)
		}
		if len(bad) > 0 {
			if len(bad) > 10 {
				bad = append(bad[:10], fmt.Sprintf("... %d more", len(bad)-10))
			}
			t.Errorf("%d new connections failed after b2 was killed:\n%s", len(bad), strings.Join(bad, "\n"))
		}
	})
}

// pingPong is one short connection: greeting, one echoed line, close. It
// returns the id of the backend that greeted.
func pingPong(ns *nettest.NS, msg string) (string, error) {
	c, err := nettest.Dial(ns, proxyAddr, 2*time.Second)
	if err != nil {
		return "", fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	line, err := nettest.ReadLine(c, 2*time.Second)
	if err != nil || !strings.HasPrefix(line, "hello from ") {
		return "", fmt.Errorf("greeting %q: %v", line, err)
	}
	id := strings.TrimPrefix(line, "hello from ")
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return id, fmt.Errorf("write: %w", err)
	}
	if got, err := nettest.ReadLine(c, 2*time.Second); err != nil || got != msg {
		return id, fmt.Errorf("echo %q: %v", got, err)
	}
	return id, nil
}

// TestRefusingBackendRetried: the best-scored backend's port refuses. With
// active checks off, every client still reaches the working backend through
// the retry, bytes a client sent before the proxy even accepted included.
// With no retries the client fails and the refusal is counted.
func TestRefusingBackendRetried(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9002", nettest.Greeter("b-works"))
		refusing := backendAt("a-refuses", 9001) // nothing listens on 9001
		refusing.Weight = 100                    // the best score, whatever the load
		rows := []backendRow{refusing, backendAt("b-works", 9002)}
		base := []string{adminEnv, "EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_BINDING_TTL_SECS=0"}

		t.Run("retries", func(t *testing.T) {
			p := startProxy(t, topo.Proxy, plane, rows, base...)
			for i := range 10 {
				if a := tryGreeting(topo.Client, "", proxyAddr, 3*time.Second); a.out != greeted || a.id != "b-works" {
					if a.conn != nil {
						a.conn.Close()
					}
					t.Fatalf("client %d: %s; want a greeting from b-works", i, a)
				} else {
					a.conn.Close()
				}
			}

			// A client that speaks first: its request is queued before
			// accept and must reach the backend that answers.
			if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				p.cmd.Process.Signal(syscall.SIGCONT)
				t.Fatalf("dial proxy: %v", err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("early request\n")); err != nil {
				p.cmd.Process.Signal(syscall.SIGCONT)
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			if got, err := nettest.ReadLine(c, 3*time.Second); err != nil || got != "hello from b-works" {
				t.Fatalf("client that spoke first: greeting %q, %v; want %q", got, err, "hello from b-works")
			}
			if got, err := nettest.ReadLine(c, 3*time.Second); err != nil || got != "early request" {
				t.Fatalf("client that spoke first: echo %q, %v; want its early request back", got, err)
			}

			m := scrape(t, topo.Proxy)
			if got, _ := m.get(`edgeproxy_connect_retries_total{backend="a-refuses"}`); got < 1 {
				t.Errorf(`edgeproxy_connect_retries_total{backend="a-refuses"} = %v, want > 0`, got)
			}
			if got, _ := m.get(`edgeproxy_backend_connect_errors_total{backend="a-refuses"}`); got < 1 {
				t.Errorf(`edgeproxy_backend_connect_errors_total{backend="a-refuses"} = %v, want > 0`, got)
			}
			if got, _ := m.get(`edgeproxy_backend_connect_errors_total{backend="b-works"}`); got != 0 {
				t.Errorf(`edgeproxy_backend_connect_errors_total{backend="b-works"} = %v, want 0`, got)
			}
			if got, _ := m.get(`edgeproxy_rejected_connections_total{reason="all_dials_failed"}`); got != 0 {
				t.Errorf(`rejected all_dials_failed = %v, want 0: every client had a working backend`, got)
			}
		})

		t.Run("no retries", func(t *testing.T) {
			startProxy(t, topo.Proxy, plane, rows, append(base, "EDGEPROXY_CONNECT_RETRIES=0")...)
			a := tryGreeting(topo.Client, "", proxyAddr, 3*time.Second)
			if a.conn != nil {
				a.conn.Close()
			}
			if a.out != refused {
				t.Fatalf("with EDGEPROXY_CONNECT_RETRIES=0 and the best backend refusing: %s; want the client closed without a greeting", a)
			}
			m := scrape(t, topo.Proxy)
			if got, _ := m.get(`edgeproxy_rejected_connections_total{reason="all_dials_failed"}`); got != 1 {
				t.Errorf(`rejected all_dials_failed = %v, want 1`, got)
			}
			if got, _ := m.get(`edgeproxy_connect_retries_total{backend="a-refuses"}`); got != 0 {
				t.Errorf(`edgeproxy_connect_retries_total{backend="a-refuses"} = %v with retries off, want 0`, got)
			}
		})
	})
}

// TestPanicRouting: every backend refuses, the checks mark them all down and
// the proxy routes as if all were up. A backend that comes back is reached
// at once, before rise successes mark it up, because panic routing tries it
// and the retry skips the dead one.
func TestPanicRouting(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		const interval, rise = 1, 3
		env := append(healthEnv(interval, 1, rise), adminEnv, "EDGEPROXY_BINDING_TTL_SECS=0")
		startProxy(t, topo.Proxy, plane, []backendRow{backendAt("p1", 9011), backendAt("p2", 9012)}, env...)
		waitUntil(t, 4*time.Second, "panic routing with both backends down", func() (bool, string) {
			st := proxyStatus(t, topo.Proxy)
			p1, _ := st.backend("p1")
			p2, _ := st.backend("p2")
			return st.Panic && p1.State == "down" && p2.State == "down", st.states()
		})

		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9012", nettest.Greeter("p2"))
		before := proxyStatus(t, topo.Proxy)
		a := tryGreeting(topo.Client, "", proxyAddr, 3*time.Second)
		if a.conn != nil {
			a.conn.Close()
		}
		if a.out != greeted || a.id != "p2" {
			t.Fatalf("in panic with p2 listening again: %s; want a greeting from p2 (status before the dial: %s)", a, before.states())
		}
		if p2, _ := before.backend("p2"); p2.State != "down" || !before.Panic {
			t.Errorf("status before the dial was %s; want p2 still down and panic on, so the dial proves panic routing", before.states())
		}

		took := waitUntil(t, time.Duration(rise*interval)*time.Second+3*time.Second, "p2 up and panic over", func() (bool, string) {
			st := proxyStatus(t, topo.Proxy)
			p2, _ := st.backend("p2")
			return p2.State == "up" && !st.Panic, st.states()
		})
		t.Logf("%s: p2 up and panic over %s after it listened", plane, took.Round(10*time.Millisecond))
		st := proxyStatus(t, topo.Proxy)
		if p1, _ := st.backend("p1"); p1.State != "down" {
			t.Errorf("p1 still refuses but its state is %q: %s", p1.State, st.states())
		}
		for i := range 5 {
			a := tryGreeting(topo.Client, "", proxyAddr, 3*time.Second)
			if a.conn != nil {
				a.conn.Close()
			}
			if a.out != greeted || a.id != "p2" {
				t.Fatalf("client %d after panic ended: %s; want p2", i, a)
			}
		}
	})
}
