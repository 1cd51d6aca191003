//go:build linux

package integration

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// forEachPlane runs body once per data plane with a fresh topology and
// a proxy whose only backend is the server body starts.
func forEachPlane(t *testing.T, body func(t *testing.T, plane string)) {
	nettest.RequireRoot(t)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) { body(t, plane) })
	}
}

func TestClientSpeaksBeforeProxyAccepts(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			line, err := nettest.ReadLine(c, 5*time.Second)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "reply to %s\n", line)
		})
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})

		// With the proxy stopped, the kernel still completes the
		// handshake, so the request is queued before accept().
		if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			p.cmd.Process.Signal(syscall.SIGCONT)
			t.Fatalf("dial proxy: %v", err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("request 1\n")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		got, err := nettest.ReadLine(c, 3*time.Second)
		if err != nil || got != "reply to request 1" {
			t.Fatalf("reply = %q, %v; want %q", got, err, "reply to request 1")
		}
		c.Close()
		p.waitNoEntries(t)
	})
}

func TestServerSpeaksFirst(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})
		for i := range 20 {
			c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Fatalf("dial %d: %v", i, err)
			}
			if got, err := nettest.ReadLine(c, 3*time.Second); err != nil || got != "hello from b1" {
				t.Fatalf("connection %d: greeting %q, %v", i, got, err)
			}
			msg := fmt.Sprintf("echo %d", i)
			fmt.Fprintln(c, msg)
			if got, err := nettest.ReadLine(c, 3*time.Second); err != nil || got != msg {
				t.Fatalf("connection %d: echo %q, %v", i, got, err)
			}
			c.Close()
		}
		p.waitNoEntries(t)
	})
}

// The client sends everything and shuts its write side; the server's
// digest of what it read comes back after that FIN.
func TestHalfCloseClientFirst(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Exchange)
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})
		for i, size := range []int64{0, 1, 1 << 20} {
			c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := nettest.RunExchange(withTimeout(t, 20*time.Second), c, uint64(i), size, 1000, 64<<10, 0); err != nil {
				t.Fatalf("exchange of %d bytes: %v", size, err)
			}
			c.Close()
		}
		p.waitNoEntries(t)
	})
}

// The server says goodbye and shuts its write side first; the client sees
// EOF and then still sends a payload the server receives byte-exact.
func TestHalfCloseServerFirst(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		received := make(chan string, 1)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			io.WriteString(c, "bye\n")
			c.CloseWrite()
			h := sha256.New()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := io.Copy(h, c)
			received <- fmt.Sprintf("%d %x %v", n, h.Sum(nil), err)
		})
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		all, err := io.ReadAll(c)
		if err != nil || string(all) != "bye\n" {
			t.Fatalf("read until server's FIN: %q, %v", all, err)
		}
		payload := make([]byte, 3<<20)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		if _, err := c.Write(payload); err != nil {
			t.Fatalf("write after server's FIN: %v", err)
		}
		c.CloseWrite()
		want := fmt.Sprintf("%d %x <nil>", len(payload), sha256.Sum256(payload))
		select {
		case got := <-received:
			if got != want {
				t.Fatalf("server received %s, want %s", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("server did not receive the client's payload within 10s")
		}
		c.Close()
		p.waitNoEntries(t)
	})
}

func TestResetPropagates(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		type serverSide struct {
			c      *net.TCPConn
			closed chan error
		}
		accepted := make(chan serverSide, 1)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			s := serverSide{c, make(chan error, 1)}
			io.WriteString(c, "ready\n")
			accepted <- s
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.Copy(io.Discard, c)
			s.closed <- err
		})
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})

		connect := func() (*net.TCPConn, serverSide) {
			c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if l, err := nettest.ReadLine(c, 3*time.Second); err != nil || l != "ready" {
				t.Fatalf("greeting %q, %v", l, err)
			}
			return c, <-accepted
		}

		t.Run("client resets", func(t *testing.T) {
			c, s := connect()
			c.SetLinger(0)
			start := time.Now()
			c.Close()
			select {
			case err := <-s.closed:
				if err == nil || !errors.Is(err, syscall.ECONNRESET) {
					t.Logf("backend saw %v (want a reset, a clean EOF also ends it)", err)
				}
				if d := time.Since(start); d > 2*time.Second {
					t.Fatalf("backend ended %s after the client's reset, want within 2s", d)
				}
			case <-time.After(2 * time.Second):
				t.Fatal("backend still connected 2s after the client reset")
			}
		})
		t.Run("backend resets", func(t *testing.T) {
			c, s := connect()
			defer c.Close()
			s.c.SetLinger(0)
			start := time.Now()
			s.c.Close()
			_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err := io.Copy(io.Discard, c)
			if isTimeout(err) {
				t.Fatal("client still connected 2s after the backend reset")
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("client saw %v after the backend reset, want connection reset", err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("client ended %s after the backend's reset", d)
			}
		})
		p.waitNoEntries(t)
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// memAvailableKiB is the machine's MemAvailable: kernel memory held for
// a slow receiver shows there, not in the proxy's RSS.
func memAvailableKiB(t testing.TB) int {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatal("MemAvailable missing")
	return 0
}

func selfRSSKiB(t testing.TB) int {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

func TestSlowReader256MiB(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Exchange)
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})
		// Memory the test process itself frees or grows would read as
		// kernel memory: settle it first and subtract its changes.
		runtime.GC()
		debug.FreeOSMemory()
		baseSelf := selfRSSKiB(t)
		baseRSS, baseAvail := p.rssKiB(t), memAvailableKiB(t)

		var maxRSS, maxDrop int
		var series []string
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					rss := p.rssKiB(t)
					drop := baseAvail - memAvailableKiB(t) - (rss - baseRSS) - (selfRSSKiB(t) - baseSelf)
					maxRSS, maxDrop = max(maxRSS, rss), max(maxDrop, drop)
					series = append(series, fmt.Sprintf("%s rss=%d drop=%d", time.Now().Format("05.000"), rss, drop))
				}
			}
		}()
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		// 32 KiB every millisecond at most: far slower than the sender.
		_, err = nettest.RunExchange(withTimeout(t, 60*time.Second), c, 7, 1<<10, 256<<20, 32<<10, time.Millisecond)
		close(stop)
		<-sampled
		c.Close()
		if err != nil {
			t.Fatalf("256 MiB to a slow reader: %v", err)
		}
		t.Logf("%s: proxy RSS %d KiB at start, %d KiB at most; kernel memory in use grew by %d KiB at most",
			plane, baseRSS, maxRSS, maxDrop)
		if maxRSS-baseRSS > 64<<10 {
			t.Errorf("proxy RSS grew by %d KiB during the transfer, want under 64 MiB", maxRSS-baseRSS)
		}
		if maxDrop > 128<<10 || testing.Verbose() {
			t.Logf("samples: %s", strings.Join(series, "; "))
		}
		if maxDrop > 128<<10 {
			t.Errorf("kernel memory in use grew by %d KiB during the transfer, want under 128 MiB: data is piling up in the kernel", maxDrop)
		}
		p.waitNoEntries(t)
	})
}

func TestConcurrentRandomPayloads(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Exchange)
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)})
		const conns = 200
		rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
		ctx := withTimeout(t, 180*time.Second)
		var wg sync.WaitGroup
		errs := make(chan error, conns)
		var total int64
		for i := range conns {
			up, down := rng.Int64N(8<<20+1), rng.Int64N(8<<20+1)
			total += up + down
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := nettest.Dial(topo.Client, proxyAddr, 5*time.Second)
				if err != nil {
					errs <- fmt.Errorf("connection %d: dial: %w", i, err)
					return
				}
				defer c.Close()
				if _, err := nettest.RunExchange(ctx, c, uint64(i)*2, up, down, 64<<10, 0); err != nil {
					errs <- fmt.Errorf("connection %d (%d up, %d down): %w", i, up, down, err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		t.Logf("%s: %d connections moved %d MiB byte-exact", plane, conns, total>>20)
		p.waitNoEntries(t)
	})
}

// A backend that writes its greeting the instant it accepts races the
// proxy's pairing of the two sockets; on loopback the race is tightest.
func TestInstantGreetingOnLoopback(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		greeting := strings.Repeat("greetings from the backend, byte-exact please. ", 40) + "\n"
		nettest.Serve(t, topo.Proxy, "127.0.0.1:9000", func(c *net.TCPConn) {
			io.WriteString(c, greeting)
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			io.Copy(io.Discard, c)
		})
		p := startProxy(t, topo.Proxy, plane, []backendRow{{ID: "lo", Region: "sa", Country: "BR", Addr: "127.0.0.1", Port: 9000, Healthy: true, Weight: 1, Soft: 1000}})
		buf := make([]byte, len(greeting))
		deadline := time.Now().Add(120 * time.Second)
		for i := range 5000 {
			if time.Now().After(deadline) {
				t.Fatalf("only %d of 5000 connections within 120s", i)
			}
			c, err := nettest.Dial(topo.Proxy, "127.0.0.1:8080", 2*time.Second)
			if err != nil {
				t.Fatalf("connection %d: dial: %v", i, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := io.ReadFull(c, buf)
			c.Close()
			if err != nil || string(buf) != greeting {
				t.Fatalf("connection %d: read %d of %d greeting bytes (%v); intact: %v", i, n, len(greeting), err, string(buf[:n]) == greeting[:n])
			}
		}
		p.waitNoEntries(t)
	})
}

// Connections that end mid-transfer, from either side, leave nothing in
// the maps.
func TestNoMapEntriesAfterAbortedTransfers(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
		// Stream until the client goes away, or reset after a while.
		if line, err := nettest.ReadLine(c, 5*time.Second); err == nil && line == "reset soon" {
			go func() { time.Sleep(30 * time.Millisecond); c.SetLinger(0); c.Close() }()
		}
		io.Copy(struct{ io.Writer }{c}, nettest.NewStream(1))
	})
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)})
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Errorf("dial %d: %v", i, err)
				return
			}
			defer c.Close()
			mode := []string{"client closes", "client resets", "reset soon"}[i%3]
			fmt.Fprintln(c, mode)
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			io.CopyN(io.Discard, c, 1<<20)
			if mode == "client resets" {
				c.SetLinger(0)
			}
		}()
	}
	wg.Wait()
	p.waitNoEntries(t)
}

func TestKilledProxyRestartsWithoutCleanup(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)})
	held, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	p.kill()
	if _, err := os.Stat(p.PinPath + "/sockets"); err != nil {
		t.Fatalf("SIGKILL should leave the pins behind for this test to mean anything: %v", err)
	}
	p.start(t, topo.Proxy, nil)
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	p.waitNoEntries(t)
}

var _ = context.Background
