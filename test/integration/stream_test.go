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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"golang.org/x/sys/unix"
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
		// No health checks: each connection here must be the proxied one.
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")

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

// tcpInfo reads TCP_INFO of one of the test's own sockets.
func tcpInfo(c *net.TCPConn) (*unix.TCPInfo, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var info *unix.TCPInfo
	var infoErr error
	if err := raw.Control(func(fd uintptr) {
		info, infoErr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return nil, err
	}
	return info, infoErr
}

// The proxy relays 256 MiB from a fast backend to a client that reads
// slowly; what it holds meanwhile must stay bounded, in its RSS and in the
// kernel. The kernel side is measured as bytes, from the two ends the test
// owns: what the backend's socket has had acknowledged by the proxy, minus
// what has reached the client's socket. The difference is everything the
// proxy holds for that direction wherever it sits: its backend socket's
// receive queue, a psock queue (redirected skbs are charged to no socket,
// so no per-socket or cgroup counter sees them), userspace, its client
// socket's send queue. Machine-wide figures such as MemAvailable are not a
// measure of this: other processes (the other packages of `go test ./...`,
// builds, other tests) and the per-CPU page lists move them by hundreds of
// MiB during the transfer.
func TestSlowReader256MiB(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		// The backend's socket stays open until sampling ends, so its
		// TCP_INFO can be read to the last sample.
		backends := make(chan *net.TCPConn, 1)
		release := make(chan struct{})
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			select {
			case backends <- c:
			default: // not the proxied connection: nothing waits for it
			}
			nettest.Exchange(c)
			<-release
		})
		var releaseOnce sync.Once
		releaseBackend := func() { releaseOnce.Do(func() { close(release) }) }
		t.Cleanup(releaseBackend) // before the server's own cleanup waits for it
		// No health checks: their connections would reach this handler
		// too, and the sampler must read the proxied connection's socket.
		p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
		baseRSS := p.rssKiB(t)

		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var maxRSS int
		var maxHeld int64
		var series []string
		var sampleErr error
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			var b *net.TCPConn
			select {
			case b = <-backends:
			case <-stop:
				return
			case <-time.After(5 * time.Second):
				sampleErr = errors.New("the backend saw no connection within 5s")
				return
			}
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				// Backend first: bytes that move between the two reads can
				// only make held smaller, never larger, than it was.
				bi, err := tcpInfo(b)
				if err != nil {
					sampleErr = fmt.Errorf("backend TCP_INFO: %w", err)
					return
				}
				ci, err := tcpInfo(c)
				if err != nil {
					sampleErr = fmt.Errorf("client TCP_INFO: %w", err)
					return
				}
				held := int64(bi.Bytes_acked) - int64(ci.Bytes_received)
				rss := p.rssKiB(t)
				maxRSS, maxHeld = max(maxRSS, rss), max(maxHeld, held)
				series = append(series, fmt.Sprintf("%s rss=%d held=%d", time.Now().Format("05.000"), rss, held>>10))
			}
		}()
		// 32 KiB every millisecond at most: far slower than the sender.
		_, err = nettest.RunExchange(withTimeout(t, 60*time.Second), c, 7, 1<<10, 256<<20, 32<<10, time.Millisecond)
		close(stop)
		<-sampled
		releaseBackend()
		c.Close()
		if err != nil {
			t.Fatalf("256 MiB to a slow reader: %v", err)
		}
		if sampleErr != nil {
			t.Fatal(sampleErr)
		}
		t.Logf("%s: proxy RSS %d KiB at start, %d KiB at most; the proxy held %d KiB of the transfer at most",
			plane, baseRSS, maxRSS, maxHeld>>10)
		if maxRSS-baseRSS > 64<<10 {
			t.Errorf("proxy RSS grew by %d KiB during the transfer, want under 64 MiB", maxRSS-baseRSS)
		}
		if maxHeld > heldBound || testing.Verbose() {
			t.Logf("samples (KiB): %s", strings.Join(series, "; "))
		}
		if maxHeld > heldBound {
			t.Errorf("the proxy held %d KiB of the transfer at once, want under %d MiB: data is piling up in the kernel", maxHeld>>10, heldBound>>20)
		}
		p.waitNoEntries(t)
	})
}

// heldBound is how much of a transfer the proxy may hold for a slow
// reader.
const heldBound = 128 << 20

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
