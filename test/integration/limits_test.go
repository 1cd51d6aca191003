//go:build linux

package integration

import (
	"fmt"
	"net"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// clientB is a second address of the client host: a client the flood from
// nettest.ClientIP must not slow down.
const clientB = "10.77.1.3"

// refusedAtOnce is how long a refusal may take: the proxy closes a refused
// connection at once.
const refusedAtOnce = time.Second

// latencies summarises greeting latencies for the log.
func latencies(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	r := func(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }
	return fmt.Sprintf("n=%d min %s median %s max %s", len(s), r(s[0]), r(s[len(s)/2]), r(s[len(s)-1]))
}

// reportSome fails the test with the first few of many problems and their
// count.
func reportSome(t *testing.T, problems []string) {
	t.Helper()
	if len(problems) == 0 {
		return
	}
	shown := problems[:min(5, len(problems))]
	t.Errorf("%d problems, the first %d:\n%s", len(problems), len(shown), strings.Join(shown, "\n"))
}

// TestClientLimitsFlood: one client address floods the proxy; the per-client
// limits refuse its excess at once and count it, and another address of the
// same host still gets every connection through.
func TestClientLimitsFlood(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.AddAddr(t, topo.Client, topo.ClientDev, clientB+"/24")
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
		rows := []backendRow{backendAt("b1", 9000)}
		base := []string{adminEnv, "EDGEPROXY_HEALTH_INTERVAL_SECS=0"}

		t.Run("max conns", func(t *testing.T) {
			startProxy(t, topo.Proxy, plane, rows, append(base, "EDGEPROXY_CLIENT_MAX_CONNS=5")...)
			var held []*net.TCPConn
			defer func() {
				for _, c := range held {
					c.Close()
				}
			}()
			for i := range 5 {
				a := tryGreeting(topo.Client, nettest.ClientIP, proxyAddr, 2*time.Second)
				if a.out != greeted {
					if a.conn != nil {
						a.conn.Close()
					}
					t.Fatalf("connection %d of 5 from %s: %s; want a greeting", i+1, nettest.ClientIP, a)
				}
				held = append(held, a.conn)
			}

			// The flood: more connections from the same address, all
			// refused at once, while the other address opens its own.
			const flood = 40
			var (
				wg       sync.WaitGroup
				mu       sync.Mutex
				floodBad []string
				nRefused int
			)
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range flood / 4 {
						a := tryGreeting(topo.Client, nettest.ClientIP, proxyAddr, 2*time.Second)
						if a.conn != nil {
							a.conn.Close()
						}
						mu.Lock()
						if a.out == refused && a.latency < refusedAtOnce {
							nRefused++
						} else {
							floodBad = append(floodBad, fmt.Sprintf("flood worker %d attempt %d from %s over the limit of 5: %s; want refused at once", w, i, nettest.ClientIP, a))
						}
						mu.Unlock()
					}
				}()
			}
			var otherLat []time.Duration
			for i := range 5 {
				a := tryGreeting(topo.Client, clientB, proxyAddr, 2*time.Second)
				if a.out != greeted {
					if a.conn != nil {
						a.conn.Close()
					}
					t.Errorf("connection %d of 5 from %s during the flood from %s: %s; want a greeting", i+1, clientB, nettest.ClientIP, a)
					continue
				}
				held = append(held, a.conn)
				otherLat = append(otherLat, a.latency)
			}
			wg.Wait()
			t.Logf("%s: %s greetings during the flood: %s", plane, clientB, latencies(otherLat))
			reportSome(t, floodBad)
			m := scrape(t, topo.Proxy)
			if got, _ := m.get(`edgeproxy_rejected_connections_total{reason="client_max_conns"}`); got != float64(nRefused) || nRefused != flood {
				t.Errorf(`rejected client_max_conns = %v; the flood of %d saw %d refusals`, got, flood, nRefused)
			}
			if got, _ := m.get(`edgeproxy_backend_connect_errors_total{backend="b1"}`); got != 0 {
				t.Errorf("b1 connect errors = %v, want 0: refusals are not the backend's fault", got)
			}

			// A slot frees when one of the five ends.
			held[0].Close()
			held = held[1:]
			waitUntil(t, 2*time.Second, "a freed slot taken again by "+nettest.ClientIP, func() (bool, string) {
				a := tryGreeting(topo.Client, nettest.ClientIP, proxyAddr, 2*time.Second)
				if a.conn != nil {
					held = append(held, a.conn)
				}
				return a.out == greeted, a.String()
			})
		})

		t.Run("rate", func(t *testing.T) {
			const rate = 20
			startProxy(t, topo.Proxy, plane, rows, append(base, fmt.Sprintf("EDGEPROXY_CLIENT_RATE=%d", rate))...)
			var (
				wg                   sync.WaitGroup
				mu                   sync.Mutex
				floodBad             []string
				nGreeted, nRefused   int
				otherDone            = make(chan struct{})
				floodStart, floodEnd time.Time
			)
			floodStart = time.Now()
			for w := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 200 {
						select {
						case <-otherDone:
							return
						default:
						}
						a := tryGreeting(topo.Client, nettest.ClientIP, proxyAddr, 2*time.Second)
						if a.conn != nil {
							a.conn.Close()
						}
						mu.Lock()
						switch {
						case a.out == greeted:
							nGreeted++
						case a.out == refused && a.latency < refusedAtOnce:
							nRefused++
						default:
							floodBad = append(floodBad, fmt.Sprintf("flood worker %d attempt %d from %s: %s; want a greeting or a refusal at once", w, i, nettest.ClientIP, a))
						}
						mu.Unlock()
						time.Sleep(10 * time.Millisecond)
					}
				}()
			}
			// The other address: 20 connections at 10 per second, half
			// its allowance.
			var otherLat []time.Duration
			for i := range 20 {
				a := tryGreeting(topo.Client, clientB, proxyAddr, 2*time.Second)
				if a.conn != nil {
					a.conn.Close()
				}
				if a.out != greeted {
					t.Errorf("connection %d of 20 from %s during the flood from %s: %s; want a greeting within 2s", i+1, clientB, nettest.ClientIP, a)
				} else {
					otherLat = append(otherLat, a.latency)
				}
				time.Sleep(100 * time.Millisecond)
			}
			close(otherDone)
			wg.Wait()
			floodEnd = time.Now()
			reportSome(t, floodBad)
			secs := floodEnd.Sub(floodStart).Seconds()
			t.Logf("%s: flood from %s over %.1fs: %d greeted, %d refused; %s greetings: %s",
				plane, nettest.ClientIP, secs, nGreeted, nRefused, clientB, latencies(otherLat))
			if nRefused == 0 {
				t.Errorf("a flood of %d connections in %.1fs from one address at EDGEPROXY_CLIENT_RATE=%d saw no refusal", nGreeted, secs, rate)
			}
			// Allow a burst of up to two seconds' worth on top of the rate.
			if limit := int(rate * (secs + 2)); nGreeted > limit {
				t.Errorf("the flood got %d connections through in %.1fs at %d per second, want at most %d", nGreeted, secs, rate, limit)
			}
			m := scrape(t, topo.Proxy)
			if got, _ := m.get(`edgeproxy_rejected_connections_total{reason="client_rate"}`); got != float64(nRefused) {
				t.Errorf(`rejected client_rate = %v, the flood saw %d refusals`, got, nRefused)
			}
		})
	})
}

// TestLowDescriptorLimit runs the proxy with 64 open files and no
// EDGEPROXY_MAX_CONNS, then holds more connections than fit. The ones that
// fit work, the rest are refused at once or wait in the listen backlog, and
// running out of descriptors is nobody's fault but the proxy's: no backend
// counts a connect error or fails a check, the proxy stays near idle and
// logs at most about one accept warning per second.
func TestLowDescriptorLimit(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		t.Run("derived cap", func(t *testing.T) { lowDescriptorLimit(t, plane, false) })
		// A cap above what the descriptors hold: accept and dial meet
		// EMFILE, the case that used to spin and blame the backends.
		t.Run("cap above the limit", func(t *testing.T) { lowDescriptorLimit(t, plane, true, "EDGEPROXY_MAX_CONNS=1000") })
	})
}

// lowDescriptorLimit is one run of TestLowDescriptorLimit; exhausted says the
// descriptors, not the cap, run out first, so the admin server can only be
// asked once the clients are gone.
func lowDescriptorLimit(t *testing.T, plane string, exhausted bool, extraEnv ...string) {
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b1"))
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9002", nettest.Greeter("b2"))
	rows := []backendRow{backendAt("b1", 9001), backendAt("b2", 9002)}
	// Fast checks with fall 1: a check that failed for want of a
	// descriptor would mark a backend down at once.
	env := append(healthEnv(1, 1, 1), adminEnv, "EDGEPROXY_BINDING_TTL_SECS=0")
	env = append(env, extraEnv...)
	p := startProxyWrapped(t, topo.Proxy, plane, rows, []string{"prlimit", "--nofile=64:64"}, env...)
	if comm, err := readProcFile(p.cmd.Process.Pid, "comm"); err != nil || comm != "edgeproxy" {
		t.Fatalf("pid %d runs %q (%v), want edgeproxy: the wrapper must exec it", p.cmd.Process.Pid, comm, err)
	}
	if lim, err := readProcFile(p.cmd.Process.Pid, "limits"); err != nil || !regexp.MustCompile(`Max open files\s+64\s+64\s`).MatchString(lim) {
		t.Fatalf("the proxy's open-file limit is not 64:\n%s%v", lim, err)
	}

	const conns = 60
	var attempts []attempt
	defer func() {
		for _, a := range attempts {
			if a.conn != nil {
				a.conn.Close()
			}
		}
	}()
	count := map[outcome]int{}
	for i := range conns {
		a := tryGreeting(topo.Client, "", proxyAddr, time.Second)
		attempts = append(attempts, a)
		count[a.out]++
		if a.out == broken || (a.out == refused && a.latency > refusedAtOnce) {
			t.Errorf("connection %d of %d: %s; want a greeting, a refusal at once, or a wait in the backlog", i+1, conns, a)
		}
	}
	t.Logf("%s: %d connections at 64 open files: %d greeted, %d refused, %d waiting", plane, conns, count[greeted], count[refused], count[silent])
	if count[greeted] == 0 {
		t.Fatalf("no connection got through at 64 open files")
	}
	if count[greeted] == conns {
		t.Fatalf("all %d connections got through at 64 open files: the test holds too few to exhaust them", conns)
	}
	// The ones that fit work.
	for i, a := range attempts {
		if a.out != greeted {
			continue
		}
		msg := fmt.Sprintf("still here %d", i)
		fmt.Fprintln(a.conn, msg)
		if got, err := nettest.ReadLine(a.conn, 2*time.Second); err != nil || got != msg {
			t.Errorf("connection %d (greeted by %s): echo %q, %v", i+1, a.id, got, err)
		}
	}

	// Take one more descriptor with an admin connection that sends
	// nothing, then queue a few more clients: accept now has no
	// descriptor either, the case that used to spin.
	var hog *net.TCPConn
	if err := topo.Proxy.Do(func() error {
		c, err := net.DialTimeout("tcp", adminAddr, 2*time.Second)
		if err == nil {
			hog = c.(*net.TCPConn)
		}
		return err
	}); err != nil {
		t.Fatalf("dial the admin server: %v", err)
	}
	defer hog.Close()
	for i := range 10 {
		a := tryGreeting(topo.Client, "", proxyAddr, 300*time.Millisecond)
		attempts = append(attempts, a)
		count[a.out]++
		if a.out == broken || a.out == greeted || (a.out == refused && a.latency > refusedAtOnce) {
			t.Errorf("connection %d of 10 past the limit: %s; want a refusal at once or a wait in the backlog", i+1, a)
		}
	}
	t.Logf("%s: with 10 more: %d refused, %d waiting in all", plane, count[refused], count[silent])

	// Hold for 3s: CPU near idle, a handful of accept warnings at most.
	logsBefore := len(p.logs.String())
	cpuBefore := p.cpuTicks(t)
	time.Sleep(3 * time.Second)
	cpu := p.cpuTicks(t) - cpuBefore
	var warnings []string
	for _, line := range strings.Split(p.logs.String()[logsBefore:], "\n") {
		if strings.Contains(strings.ToLower(line), "accept") {
			warnings = append(warnings, line)
		}
	}
	t.Logf("%s: holding for 3s: %d CPU ticks, %d accept log lines", plane, cpu, len(warnings))
	// USER_HZ is 100 on Linux: 50 ticks are 0.5s.
	if cpu >= 50 {
		t.Errorf("the proxy used %d CPU ticks (1/100 s) in 3s holding at the descriptor limit, want under 50: it spins", cpu)
	}
	if len(warnings) > 5 {
		t.Errorf("%d accept log lines in 3s at the descriptor limit, want at most about one per second; first ones:\n%s",
			len(warnings), strings.Join(warnings[:min(5, len(warnings))], "\n"))
	}

	hog.Close()
	if exhausted {
		for i := range attempts {
			if attempts[i].conn != nil {
				attempts[i].conn.Close()
				attempts[i].conn = nil
			}
		}
	}
	st := proxyStatus(t, topo.Proxy)
	for _, b := range st.Backends {
		if b.State != "up" {
			t.Errorf("backend %s state %q at the descriptor limit, want up: %s", b.ID, b.State, st.states())
		}
		if b.ConnectErrors != 0 {
			t.Errorf("backend %s has %d connect errors at the descriptor limit, want 0", b.ID, b.ConnectErrors)
		}
	}
	// The admin server could not be asked while descriptors ran out:
	// the log says whether a backend went down meanwhile.
	for _, line := range strings.Split(p.logs.String(), "\n") {
		if strings.Contains(line, `msg="backend down"`) || strings.Contains(line, `msg="panic routing on`) {
			t.Errorf("at the descriptor limit: %s", line)
		}
	}
	m := scrape(t, topo.Proxy)
	rejected, _ := m.get(`edgeproxy_rejected_connections_total{reason="max_conns"}`)
	if count[refused] > 0 && rejected == 0 {
		t.Errorf(`%d connections refused but rejected max_conns = 0`, count[refused])
	}
	for _, id := range []string{"b1", "b2"} {
		if got, _ := m.get(fmt.Sprintf(`edgeproxy_backend_connect_errors_total{backend=%q}`, id)); got != 0 {
			t.Errorf("edgeproxy_backend_connect_errors_total{backend=%q} = %v, want 0", id, got)
		}
		if got, _ := m.get(fmt.Sprintf(`edgeproxy_health_checks_total{backend=%q,result="fail"}`, id)); got != 0 {
			t.Errorf("edgeproxy_health_checks_total{backend=%q,result=\"fail\"} = %v, want 0", id, got)
		}
	}

	// Once the clients go, the proxy serves again.
	for i := range attempts {
		if attempts[i].conn != nil {
			attempts[i].conn.Close()
			attempts[i].conn = nil
		}
	}
	waitUntil(t, 3*time.Second, "a new client served after the others left", func() (bool, string) {
		a := tryGreeting(topo.Client, "", proxyAddr, time.Second)
		if a.conn != nil {
			a.conn.Close()
		}
		return a.out == greeted, a.String()
	})
}
