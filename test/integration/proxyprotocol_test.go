//go:build linux

package integration

import (
	"bufio"
	"bytes"
	encodingbinary "encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/pires/go-proxyproto"
)

// headerBackend is a backend that expects a PROXY header: it parses one
// with go-proxyproto, greets with what it says ("hello from ID v=2
// src=A:P dst=B:Q", or "hello from ID error=..." without a valid one),
// then echoes what follows the header until EOF. Bytes the client sent
// before the greeting come back after it, so a header that arrived after
// them (or not at all) fails the parse and shows in the greeting.
func headerBackend(id string) nettest.Handler {
	return func(c *net.TCPConn) {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		greeting := "hello from " + id
		if err != nil {
			greeting += " error=" + strings.ReplaceAll(err.Error(), " ", "_")
		} else {
			greeting += fmt.Sprintf(" v=%d cmd=%d src=%s dst=%s", h.Version, h.Command, h.SourceAddr, h.DestinationAddr)
		}
		if _, err := c.Write([]byte(greeting + "\n")); err != nil {
			return
		}
		if _, err := io.Copy(struct{ io.Writer }{c}, br); err != nil {
			return
		}
		_ = c.CloseWrite()
	}
}

// countingGreeter is nettest.Greeter that counts the connections it
// accepted and the bytes it received.
func countingGreeter(id string, conns, bytesIn *atomic.Int64) nettest.Handler {
	return func(c *net.TCPConn) {
		conns.Add(1)
		if _, err := c.Write([]byte("hello from " + id + "\n")); err != nil {
			return
		}
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			bytesIn.Add(int64(n))
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				_ = c.CloseWrite()
				return
			}
		}
	}
}

func v2Header(t *testing.T, src, dst string) []byte {
	t.Helper()
	s, _ := net.ResolveTCPAddr("tcp", src)
	d, _ := net.ResolveTCPAddr("tcp", dst)
	b, err := proxyproto.HeaderProxyFromAddrs(2, s, d).Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func v2Local(t *testing.T) []byte {
	t.Helper()
	b, err := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// startHAProxy runs HAProxy in ns in TCP mode, listening on listen and
// sending every connection to server with a PROXY v2 header. It is
// stopped when the test ends.
func startHAProxy(t *testing.T, ns *nettest.NS, listen, server string) {
	t.Helper()
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatalf("haproxy not installed (apt-get install haproxy; .ci/run installs it): %v", err)
	}
	cfg := fmt.Sprintf(`global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
frontend fe
    bind %s
    default_backend be
backend be
    server edge %s send-proxy-v2
`, listen, server)
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := ns.Command("haproxy", "-db", "-f", path)
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start haproxy: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("haproxy log:\n%s", logs.String())
		}
	})
	// Asked with ss, not by connecting: HAProxy would open a connection to
	// edgeproxy for the probe and drop it before its header, a refusal the
	// test would then count.
	_, port, _ := net.SplitHostPort(listen)
	waitUntil(t, 5*time.Second, "haproxy listening", func() (bool, string) {
		out, err := ns.Command("ss", "-Hltn", "sport = :"+port).CombinedOutput()
		return err == nil && strings.Contains(string(out), listen), string(out)
	})
}

// TestProxyProtocolFromHAProxy puts HAProxy (send-proxy-v2) in front of
// edgeproxy: geo routing follows the client address inside the header,
// not HAProxy's own, and the backend, sent a v2 header of its own, sees
// that client too. A v2 LOCAL header (what a load balancer's own checks
// send) is served with the connection's own addresses.
func TestProxyProtocolFromHAProxy(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			lab := newGeoLab(t)
			rows := []backendRow{
				{ID: "br-1", Region: "sa", Country: "BR", Addr: nettest.BackendIP, Port: 9001, Healthy: true, Weight: 1, ProxyProtocol: 2},
				{ID: "us-1", Region: "us", Country: "US", Addr: nettest.BackendIP, Port: 9002, Healthy: true, Weight: 1, ProxyProtocol: 2},
			}
			for _, r := range rows {
				nettest.Serve(t, lab.backend, fmt.Sprintf("%s:%d", nettest.BackendIP, r.Port), headerBackend(r.ID))
			}
			// HAProxy runs on the US client host (11.91.3.2, the trusted
			// upstream); its client has a BR address (11.91.2.0/24 in the
			// lab's geo database) on that host's loopback.
			us := lab.clients["US"]
			upstream := strings.TrimSuffix(lab.proxyIPs["US"], ".1") + ".2"
			lab.start(t, plane, rows, "EDGEPROXY_HEALTH_INTERVAL_SECS=0",
				"EDGEPROXY_PROXY_PROTOCOL_FROM="+upstream+"/32")
			nettest.AddAddr(t, us, "lo", "11.91.2.77/32")
			startHAProxy(t, us, "127.0.0.1:7000", lab.proxyIPs["US"]+":8080")

			c, err := nettest.DialFrom(us, "11.91.2.77", "127.0.0.1:7000", 2*time.Second)
			if err != nil {
				t.Fatalf("dial haproxy: %v", err)
			}
			defer c.Close()
			client := c.LocalAddr().String()
			if _, err := c.Write([]byte("ping\n")); err != nil {
				t.Fatal(err)
			}
			greeting, err := nettest.ReadLine(c, 5*time.Second)
			if err != nil {
				t.Fatalf("greeting through haproxy: %v (got %q)", err, greeting)
			}
			want := fmt.Sprintf("hello from br-1 v=2 cmd=%d src=%s dst=%s", proxyproto.PROXY, client, "127.0.0.1:7000")
			if greeting != want {
				t.Fatalf("greeting = %q, want %q: routing or the backend's header did not follow the client inside HAProxy's header", greeting, want)
			}
			if echo, err := nettest.ReadLine(c, 3*time.Second); err != nil || echo != "ping" {
				t.Fatalf("echo after the header = %q, %v; want ping", echo, err)
			}

			// LOCAL from the trusted upstream: its own address (US) routes.
			lc, err := nettest.Dial(us, lab.proxyIPs["US"]+":8080", 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer lc.Close()
			if _, err := lc.Write(v2Local(t)); err != nil {
				t.Fatal(err)
			}
			greeting, err = nettest.ReadLine(lc, 5*time.Second)
			want = fmt.Sprintf("hello from us-1 v=2 cmd=%d src=%s dst=%s", proxyproto.PROXY, lc.LocalAddr(), lc.RemoteAddr())
			if err != nil || greeting != want {
				t.Fatalf("LOCAL header: greeting = %q, %v; want %q", greeting, err, want)
			}
			m := scrape(t, lab.proxy)
			if v, _ := m.get(`edgeproxy_rejected_connections_total{reason="proxy_protocol"}`); v != 0 {
				t.Fatalf("rejected{proxy_protocol} = %v, want 0", v)
			}
		})
	}
}

// TestProxyProtocolToBackends sends v1 and v2 headers to backends whose
// proxy_protocol column asks for them. The client writes before the
// backend answered (the first choice is an address nobody answers, so the
// dial goes to the second after a timeout): those bytes must arrive after
// the header, in order, and a bulk transfer and its FIN after them.
func TestProxyProtocolToBackends(t *testing.T) {
	for _, plane := range planes {
		for _, version := range []int{1, 2} {
			t.Run(fmt.Sprintf("%s/v%d", plane, version), func(t *testing.T) {
				topo := nettest.NewTopology(t)
				nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", headerBackend("pp"))
				rows := []backendRow{
					// Region sa is the POP's: scored before the us one.
					{ID: "silent", Region: "sa", Addr: "10.77.2.99", Port: 9001, Healthy: true, Weight: 1},
					{ID: "pp", Region: "us", Addr: nettest.BackendIP, Port: 9001, Healthy: true, Weight: 1, ProxyProtocol: version},
				}
				startProxy(t, topo.Proxy, plane, rows, adminEnv, "EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_HEALTH_FALL=1000")
				st := proxyStatus(t, topo.Proxy)
				for _, r := range rows {
					if b, ok := st.backend(r.ID); !ok || b.ProxyProtocol != r.ProxyProtocol {
						t.Fatalf("GET /status backend %s: %+v (listed %v); want proxy_protocol %d", r.ID, b, ok, r.ProxyProtocol)
					}
				}
				// `edgeproxy status` shows the header each backend is sent.
				text, err := topo.Proxy.Command(binary, "status", "--admin", adminAddr).CombinedOutput()
				if err != nil || !regexp.MustCompile(fmt.Sprintf(`(?m)^pp\s.*\sv%d\s`, version)).Match(text) ||
					!regexp.MustCompile(`(?m)^silent\s.*\s-\s`).Match(text) {
					t.Fatalf("edgeproxy status: %v; want pp sent v%d and silent none:\n%s", err, version, text)
				}
				c, err := nettest.Dial(topo.Client, nettest.ProxyClientIP+":8080", 2*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, err := c.Write([]byte("first\n")); err != nil {
					t.Fatal(err)
				}
				greeting, err := nettest.ReadLine(c, 5*time.Second)
				want := fmt.Sprintf("hello from pp v=%d cmd=%d src=%s dst=%s", version, proxyproto.PROXY, c.LocalAddr(), c.RemoteAddr())
				if err != nil || greeting != want {
					t.Fatalf("greeting = %q, %v; want %q", greeting, err, want)
				}
				if echo, err := nettest.ReadLine(c, 3*time.Second); err != nil || echo != "first" {
					t.Fatalf("bytes sent before the backend answered came back as %q, %v; want first", echo, err)
				}
				// Bulk after the header, then FIN: every byte comes back
				// before EOF (the FIN waits for the redirected bytes, which
				// the header must not be counted among).
				payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<14) // 256 KiB
				errc := make(chan error, 1)
				go func() {
					_, err := c.Write(payload)
					if err == nil {
						err = c.CloseWrite()
					}
					errc <- err
				}()
				_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
				got, err := io.ReadAll(c)
				if err != nil {
					t.Fatalf("read echo: %v after %d bytes", err, len(got))
				}
				if werr := <-errc; werr != nil {
					t.Fatalf("write: %v", werr)
				}
				if !bytes.Equal(got, payload) {
					t.Fatalf("echo: %d bytes, want %d equal to what was sent", len(got), len(payload))
				}
			})
		}
	}
}

// expectRefused checks c is closed by the proxy (reset or EOF) without a
// byte, within within.
func expectRefused(t *testing.T, what string, c *net.TCPConn, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(within))
	b := make([]byte, 64)
	n, err := c.Read(b)
	if n > 0 || err == nil {
		t.Fatalf("%s: got %q, want the connection closed", what, b[:n])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open after %s", what, within)
	}
	return time.Since(start)
}

// TestProxyProtocolRefusals runs each way a header is refused: from the
// trusted upstream a missing, malformed, oversized, truncated and too slow
// header, and from any other peer a header at all. Each connection is
// closed, nothing reaches the backend (no connection for a trusted
// upstream's refusal, no byte for an untrusted peer's), and each is
// counted by reason and cause.
func TestProxyProtocolRefusals(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			const untrustedIP = "10.77.1.3"
			nettest.AddAddr(t, topo.Client, topo.ClientDev, untrustedIP+"/24")
			var conns, bytesIn atomic.Int64
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", countingGreeter("b1", &conns, &bytesIn))
			rows := []backendRow{
				// The first choice answers nobody: a dial takes its attempt
				// timeout, so an untrusted client's first bytes are in its
				// socket when the backend answers.
				{ID: "silent", Region: "sa", Addr: "10.77.2.99", Port: 9001, Healthy: true, Weight: 1},
				{ID: "b1", Region: "us", Addr: nettest.BackendIP, Port: 9001, Healthy: true, Weight: 1},
			}
			startProxy(t, topo.Proxy, plane, rows, "EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_HEALTH_FALL=1000",
				"EDGEPROXY_ADMIN_ADDR=127.0.0.1:9090", "EDGEPROXY_PROXY_PROTOCOL_FROM="+nettest.ClientIP+"/32",
				"EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS=600")
			addr := nettest.ProxyClientIP + ":8080"
			oversized := append(append([]byte{}, proxyproto.SIGV2...), 0x21, 0x11, 0, 0)
			encodingbinary.BigEndian.PutUint16(oversized[14:], 0xF000)
			cases := []struct {
				cause, from string
				send        []byte
				closeWrite  bool
			}{
				{"missing", nettest.ClientIP, []byte("GET / HTTP/1.0\r\n\r\n"), false},
				{"malformed", nettest.ClientIP, []byte("PROXY TCP4 not-an-address 10.77.1.1 1 8080\r\n"), false},
				{"oversized", nettest.ClientIP, oversized, false},
				{"truncated", nettest.ClientIP, []byte("PROXY TCP4 10.9."), true},
				{"timeout", nettest.ClientIP, v2Header(t, "11.91.2.7:5000", "10.77.1.1:8080")[:20], false},
				{"untrusted", untrustedIP, append(v2Header(t, "11.91.2.7:5000", "10.77.1.1:8080"), "hello\n"...), false},
			}
			for _, tc := range cases {
				c, err := nettest.DialFrom(topo.Client, tc.from, addr, 2*time.Second)
				if err != nil {
					t.Fatalf("%s: dial: %v", tc.cause, err)
				}
				if _, err := c.Write(tc.send); err != nil {
					t.Fatalf("%s: write: %v", tc.cause, err)
				}
				if tc.closeWrite {
					_ = c.CloseWrite()
				}
				took := expectRefused(t, tc.cause, c, 3*time.Second)
				if tc.cause == "timeout" && took < 400*time.Millisecond {
					t.Fatalf("timeout: closed after %s, before the 600ms header timeout", took)
				}
				c.Close()
			}
			// The untrusted peer's dial reached the backend, and was reset
			// before any byte; the backend's accept may trail the reset.
			waitUntil(t, 2*time.Second, "the backend accepting the untrusted peer's connection", func() (bool, string) {
				return conns.Load() == 1, fmt.Sprintf("accepted %d", conns.Load())
			})
			if n := bytesIn.Load(); n != 0 {
				t.Fatalf("backend received %d bytes of refused connections, want 0", n)
			}
			m := scrape(t, topo.Proxy)
			for _, tc := range cases {
				series := fmt.Sprintf(`edgeproxy_proxy_protocol_refused_total{cause=%q}`, tc.cause)
				if v, _ := m.get(series); v != 1 {
					t.Errorf("%s = %v, want 1", series, v)
				}
			}
			if v, _ := m.get(`edgeproxy_rejected_connections_total{reason="proxy_protocol"}`); v != float64(len(cases)) {
				t.Errorf(`rejected{reason="proxy_protocol"} = %v, want %d`, v, len(cases))
			}
			// After all that, a good header and a plain untrusted client
			// are served.
			c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(v2Header(t, "11.91.2.7:5000", nettest.ProxyClientIP+":8080")); err != nil {
				t.Fatal(err)
			}
			if g, err := nettest.ReadLine(c, 5*time.Second); err != nil || g != "hello from b1" {
				t.Fatalf("trusted client with a header: greeting %q, %v", g, err)
			}
			u, err := nettest.DialFrom(topo.Client, untrustedIP, addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			if g, err := nettest.ReadLine(u, 5*time.Second); err != nil || g != "hello from b1" {
				t.Fatalf("untrusted client without a header: greeting %q, %v", g, err)
			}
		})
	}
}

// TestProxyProtocolSlowHeadersDoNotStall holds 20 connections whose
// header never completes on one event loop, and checks another client's
// greeting is not delayed by them.
func TestProxyProtocolSlowHeadersDoNotStall(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b1"))
			startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9001)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0",
				"EDGEPROXY_WORKERS=1", "EDGEPROXY_PROXY_PROTOCOL_FROM="+nettest.ClientIP+"/32",
				"EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS=20000")
			addr := nettest.ProxyClientIP + ":8080"
			header := v2Header(t, "11.91.2.7:5000", nettest.ProxyClientIP+":8080")
			for i := range 20 {
				c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
				if err != nil {
					t.Fatalf("slow client %d: %v", i, err)
				}
				defer c.Close()
				if _, err := c.Write(header[:1+i%(len(header)-1)]); err != nil {
					t.Fatal(err)
				}
			}
			var worst time.Duration
			for range 5 {
				start := time.Now()
				c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c.Write(header); err != nil {
					t.Fatal(err)
				}
				g, err := nettest.ReadLine(c, 5*time.Second)
				c.Close()
				if err != nil || g != "hello from b1" {
					t.Fatalf("greeting with 20 slow headers pending: %q, %v", g, err)
				}
				worst = max(worst, time.Since(start))
			}
			t.Logf("worst greeting of 5 with 20 slow headers pending: %s", worst)
			if worst > time.Second {
				t.Fatalf("a greeting took %s with 20 slow headers pending: the loop waited on them", worst)
			}
		})
	}
}

// TestProxyProtocolHeaderWithPayload has the trusted upstream send its
// header, a bulk payload and its FIN in one go, before the backend
// answered: the backend gets its own header, then every byte in order,
// then the FIN; nothing of the inbound header is forwarded.
func TestProxyProtocolHeaderWithPayload(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", headerBackend("pp"))
			rows := []backendRow{
				{ID: "silent", Region: "sa", Addr: "10.77.2.99", Port: 9001, Healthy: true, Weight: 1},
				{ID: "pp", Region: "us", Addr: nettest.BackendIP, Port: 9001, Healthy: true, Weight: 1, ProxyProtocol: 1},
			}
			startProxy(t, topo.Proxy, plane, rows, "EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_HEALTH_FALL=1000",
				"EDGEPROXY_PROXY_PROTOCOL_FROM="+nettest.ClientIP+"/32")
			c, err := nettest.Dial(topo.Client, nettest.ProxyClientIP+":8080", 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			payload := bytes.Repeat([]byte("abcdefghijklmno\n"), 8<<10) // 128 KiB
			msg := append(v2Header(t, "11.91.2.7:5000", "192.0.2.80:443"), payload...)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(msg)
				if err == nil {
					err = c.CloseWrite()
				}
				errc <- err
			}()
			greeting, err := nettest.ReadLine(c, 5*time.Second)
			want := fmt.Sprintf("hello from pp v=1 cmd=%d src=11.91.2.7:5000 dst=192.0.2.80:443", proxyproto.PROXY)
			if err != nil || greeting != want {
				t.Fatalf("greeting = %q, %v; want %q", greeting, err, want)
			}
			_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read echo: %v after %d bytes", err, len(got))
			}
			if werr := <-errc; werr != nil {
				t.Fatalf("write: %v", werr)
			}
			if !bytes.Equal(got, payload) {
				i := 0
				for i < min(len(got), len(payload)) && got[i] == payload[i] {
					i++
				}
				t.Fatalf("echo: %d bytes, want %d; first difference at byte %d", len(got), len(payload), i)
			}
		})
	}
}

// TestProxyProtocolPendingHeadersCountAgainstMaxConns: a connection
// waiting for its header holds a place under EDGEPROXY_MAX_CONNS, so
// upstreams that never finish theirs cannot run the process out of
// descriptors; the places come back when the header times out.
func TestProxyProtocolPendingHeadersCountAgainstMaxConns(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b1"))
			startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9001)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0",
				"EDGEPROXY_ADMIN_ADDR=127.0.0.1:9090", "EDGEPROXY_MAX_CONNS=4",
				"EDGEPROXY_PROXY_PROTOCOL_FROM="+nettest.ClientIP+"/32", "EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS=1500")
			addr := nettest.ProxyClientIP + ":8080"
			header := v2Header(t, "11.91.2.7:5000", nettest.ProxyClientIP+":8080")
			for i := range 4 {
				c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
				if err != nil {
					t.Fatalf("slow client %d: %v", i, err)
				}
				defer c.Close()
				if _, err := c.Write(header[:8]); err != nil {
					t.Fatal(err)
				}
			}
			// The places are taken at accept: wait until all four are.
			time.Sleep(200 * time.Millisecond)
			// The reset may beat the dial's own return.
			c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
			switch {
			case errors.Is(err, syscall.ECONNRESET):
			case err != nil:
				t.Fatal(err)
			default:
				_, _ = c.Write(header)
				expectRefused(t, "fifth connection with four headers pending", c, 3*time.Second)
				c.Close()
			}
			if v, _ := scrape(t, topo.Proxy).get(`edgeproxy_rejected_connections_total{reason="max_conns"}`); v != 1 {
				t.Fatalf(`rejected{reason="max_conns"} = %v, want 1`, v)
			}
			waitUntil(t, 5*time.Second, "the pending headers timing out", func() (bool, string) {
				v, _ := scrape(t, topo.Proxy).get(`edgeproxy_proxy_protocol_refused_total{cause="timeout"}`)
				return v == 4, fmt.Sprintf("timeout refusals %v", v)
			})
			c, err = nettest.Dial(topo.Client, addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(header); err != nil {
				t.Fatal(err)
			}
			if g, err := nettest.ReadLine(c, 5*time.Second); err != nil || g != "hello from b1" {
				t.Fatalf("after the timeouts: greeting %q, %v", g, err)
			}
		})
	}
}

// TestProxyProtocolClientLimitsUseHeaderClient: per-client limits count
// the client a header names, not the upstream every connection comes from.
func TestProxyProtocolClientLimitsUseHeaderClient(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b1"))
			startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9001)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0",
				"EDGEPROXY_ADMIN_ADDR=127.0.0.1:9090", "EDGEPROXY_CLIENT_MAX_CONNS=1",
				"EDGEPROXY_PROXY_PROTOCOL_FROM="+nettest.ClientIP+"/32")
			addr := nettest.ProxyClientIP + ":8080"
			open := func(client string) (*net.TCPConn, string) {
				c, err := nettest.Dial(topo.Client, addr, 2*time.Second)
				if err != nil {
					return nil, err.Error()
				}
				if _, err := c.Write(v2Header(t, client, nettest.ProxyClientIP+":8080")); err != nil {
					c.Close()
					return nil, err.Error()
				}
				g, err := nettest.ReadLine(c, 3*time.Second)
				if err != nil {
					c.Close()
					return nil, "closed: " + err.Error()
				}
				return c, g
			}
			a1, g := open("11.91.2.7:5000")
			if a1 == nil || g != "hello from b1" {
				t.Fatalf("first connection of client A: %q", g)
			}
			defer a1.Close()
			if a2, g := open("11.91.2.7:5001"); a2 != nil {
				a2.Close()
				t.Fatalf("second connection of client A served (%q): the limit did not count the header's client", g)
			}
			b1, g := open("11.91.4.9:5000")
			if b1 == nil || g != "hello from b1" {
				t.Fatalf("client B through the same upstream: %q: the limit counted the upstream", g)
			}
			defer b1.Close()
			if v, _ := scrape(t, topo.Proxy).get(`edgeproxy_rejected_connections_total{reason="client_max_conns"}`); v != 1 {
				t.Fatalf(`rejected{reason="client_max_conns"} = %v, want 1`, v)
			}
		})
	}
}
