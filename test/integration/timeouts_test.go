//go:build linux

package integration

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// waitActive waits until the proxy's /status reports want live
// connections.
func waitActive(t *testing.T, ns *nettest.NS, want int, within time.Duration, what string) time.Duration {
	t.Helper()
	return waitUntil(t, within, what, func() (bool, string) {
		st := proxyStatus(t, ns)
		return st.Active == want, fmt.Sprintf("active %d, want %d", st.Active, want)
	})
}

// endedBy reads c until it ends, for at most within; it returns the error
// that ended it (nil for EOF) and whether it ended at all.
func endedBy(c net.Conn, within time.Duration) (err error, ended bool) {
	_ = c.SetReadDeadline(time.Now().Add(within))
	_, err = io.Copy(io.Discard, c)
	if isTimeout(err) {
		return err, false
	}
	return err, true
}

// TestKeepaliveReapsVanishedPeer: a peer that vanishes without FIN or RST
// (its link goes down) is found dead by TCP keepalive and its connection
// closed on the other side too. With EDGEPROXY_KEEPALIVE_SECS=1: idle 1s,
// 5 probes 1s apart, so reaped within about 2x1s+5s... 6-7s; the bound is 10s.
func TestKeepaliveReapsVanishedPeer(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		for _, who := range []string{"client", "backend"} {
			t.Run(who+" vanishes", func(t *testing.T) {
				topo := nettest.NewTopology(t)
				backendEnd := make(chan error, 1)
				nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
					io.WriteString(c, "hello from b1\n")
					err, _ := endedBy(c, 30*time.Second)
					backendEnd <- err
				})
				startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)},
					adminEnv, "EDGEPROXY_KEEPALIVE_SECS=1", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
				a := tryGreeting(topo.Client, "", proxyAddr, 2*time.Second)
				if a.out != greeted {
					t.Fatalf("connect: %s", a)
				}
				defer a.conn.Close()
				waitActive(t, topo.Proxy, 1, 2*time.Second, "the connection counted")

				dev, ns := topo.ClientDev, topo.Client
				if who == "backend" {
					dev, ns = topo.BackendDev, topo.Backend
				}
				nettest.MustRun(t, "ip", "-n", ns.Name, "link", "set", dev, "down")
				took := waitActive(t, topo.Proxy, 0, 10*time.Second, "the connection of the vanished "+who+" reaped")
				t.Logf("%s: reaped %s after the %s's link went down", plane, took.Round(10*time.Millisecond), who)

				if who == "client" {
					select {
					case err := <-backendEnd:
						if isTimeout(err) {
							t.Fatalf("the backend's connection did not end: %v", err)
						}
						t.Logf("the backend saw its connection end: %v", err)
					case <-time.After(2 * time.Second):
						t.Fatal("the backend's connection still open 2s after the proxy reaped the vanished client")
					}
				} else {
					if err, ended := endedBy(a.conn, 2*time.Second); !ended {
						t.Fatalf("the client's connection still open 2s after the proxy reaped the vanished backend: %v", err)
					} else {
						t.Logf("the client saw its connection end: %v", err)
					}
				}
			})
		}
	})
}

// TestIdleTimeout: with EDGEPROXY_IDLE_TIMEOUT_SECS=2 a connection with no
// byte either way is closed on both sides about 2s after its last byte; one
// that exchanges a byte every 500ms stays open as long as it does.
func TestIdleTimeout(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		backendEnds := make(chan time.Time, 2)
		greet := nettest.Greeter("b1")
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			greet(c)
			backendEnds <- time.Now()
		})
		startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)},
			adminEnv, "EDGEPROXY_IDLE_TIMEOUT_SECS=2", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
		const timeout = 2 * time.Second

		idle := tryGreeting(topo.Client, "", proxyAddr, 2*time.Second)
		if idle.out != greeted {
			t.Fatalf("idle connection: %s", idle)
		}
		defer idle.conn.Close()
		idleLast := time.Now()
		type end struct {
			err   error
			ended bool
			at    time.Time
		}
		idleEnd := make(chan end, 1)
		go func() {
			err, ended := endedBy(idle.conn, 3*timeout)
			idleEnd <- end{err, ended, time.Now()}
		}()

		busy := tryGreeting(topo.Client, "", proxyAddr, 2*time.Second)
		if busy.out != greeted {
			t.Fatalf("busy connection: %s", busy)
		}
		defer busy.conn.Close()
		for i := range 8 {
			time.Sleep(500 * time.Millisecond)
			msg := strconv.Itoa(i)
			if _, err := fmt.Fprintln(busy.conn, msg); err != nil {
				t.Fatalf("busy connection closed after %s of a byte every 500ms: write: %v", time.Duration(i+1)*500*time.Millisecond, err)
			}
			if got, err := nettest.ReadLine(busy.conn, time.Second); err != nil || got != msg {
				t.Fatalf("busy connection closed after %s of a byte every 500ms: echo %q, %v", time.Duration(i+1)*500*time.Millisecond, got, err)
			}
		}
		busyLast := time.Now()

		e := <-idleEnd
		after := e.at.Sub(idleLast)
		t.Logf("%s: idle connection ended %s after its last byte: %v", plane, after.Round(10*time.Millisecond), e.err)
		switch {
		case !e.ended:
			t.Errorf("idle connection still open %s after its last byte, want closed after about %s", after.Round(10*time.Millisecond), timeout)
		case e.err != nil && !errors.Is(e.err, syscall.ECONNRESET):
			t.Errorf("idle connection ended with %v, want EOF or a reset", e.err)
		case after < timeout*3/4:
			t.Errorf("idle connection closed %s after its last byte, before the %s timeout", after.Round(10*time.Millisecond), timeout)
		case after > timeout+1500*time.Millisecond:
			t.Errorf("idle connection closed %s after its last byte, want within about 1s after the %s timeout", after.Round(10*time.Millisecond), timeout)
		}
		select {
		case at := <-backendEnds:
			if d := at.Sub(e.at); d > 1500*time.Millisecond {
				t.Errorf("the backend saw the idle connection end %s after the client did", d.Round(10*time.Millisecond))
			}
		default:
			if e.ended {
				t.Errorf("the backend's side of the idle connection is still open after the client's ended")
			}
		}

		// Once the busy one falls silent, it goes the same way.
		err, ended := endedBy(busy.conn, timeout+2*time.Second)
		if !ended {
			t.Errorf("busy connection still open %s after its last byte: %v", time.Since(busyLast).Round(10*time.Millisecond), err)
		} else if d := time.Since(busyLast); d < timeout*3/4 {
			t.Errorf("busy connection closed %s after its last byte, before the %s timeout", d.Round(10*time.Millisecond), timeout)
		}
		waitActive(t, topo.Proxy, 0, 2*time.Second, "no connection left")
	})
}

// tcpSockets is what ss -tinm says about the established TCP sockets of a
// namespace.
type tcpSockets struct {
	count int
	// queued is the memory of the receive and write queues of every
	// socket (skmem r and w), bytes.
	queued int
	// parked is the payload the proxy took from backends (bytes_received
	// of sockets whose peer port is backendPort) and clients have not yet
	// acknowledged (bytes_acked of sockets on port 8080): wherever in the
	// kernel it waits, socket queues or sockmap's own, it is held for the
	// proxy. Only meaningful in the proxy's namespace.
	parked int
	// Of parked, the bytes in socket queues: the Recv-Q of sockets to
	// backends and the Send-Q of sockets to clients. The rest waits in
	// sockmap's psock queues (or the splice plane's pipes).
	backendRecvQ, clientSendQ int
}

var (
	skmemRe = regexp.MustCompile(`skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+),`)
	ssNumRe = regexp.MustCompile(`\b(bytes_acked|bytes_received):(\d+)`)
)

// ssTCP reads the TCP sockets of ns. /proc/net/sockstat's "TCP ... mem"
// cannot say this: it counts the whole machine, whatever namespace reads it.
func ssTCP(t *testing.T, ns *nettest.NS, backendPort int) tcpSockets {
	t.Helper()
	out, err := ns.Command("ss", "-tinmOH").CombinedOutput()
	if err != nil {
		t.Fatalf("ss -tinmOH in %s: %v\n%s", ns.Name, err, out)
	}
	var s tcpSockets
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		s.count++
		if m := skmemRe.FindStringSubmatch(line); m != nil {
			r, _ := strconv.Atoi(m[1])
			w, _ := strconv.Atoi(m[2])
			s.queued += r + w
		}
		nums := map[string]int{}
		for _, m := range ssNumRe.FindAllStringSubmatch(line, -1) {
			nums[m[1]], _ = strconv.Atoi(m[2])
		}
		recvQ, _ := strconv.Atoi(f[1])
		sendQ, _ := strconv.Atoi(f[2])
		switch {
		case strings.HasSuffix(f[3], ":8080"):
			s.parked -= nums["bytes_acked"]
			s.clientSendQ += sendQ
		case strings.HasSuffix(f[4], fmt.Sprintf(":%d", backendPort)):
			s.parked += nums["bytes_received"]
			s.backendRecvQ += recvQ
		}
	}
	return s
}

// tcpMemPages is the machine's TCP memory in pages from /proc/net/sockstat.
func tcpMemPages(t *testing.T) int {
	data, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^TCP:.* mem (\d+)`).FindSubmatch(data); m != nil {
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	t.Fatalf("no TCP mem in /proc/net/sockstat:\n%s", data)
	return 0
}

// TestStoppedReaderBudgetAndStall: backends write without end to clients
// that never read. The bytes the proxy parks in kernel queues stay within
// EDGEPROXY_MAX_BUFFERED_MB for all connections together, and the stalled
// connections are reset after EDGEPROXY_STALL_TIMEOUT_SECS plus the sweep
// period. Each plane runs it twice: with the stream from the first byte
// (on the sockmap plane it stays spliced through a pipe, never paired) and
// after 60 ms of request/response exchange (on the sockmap plane the
// connections are paired first, so the kernel's redirect and its pauses
// carry the stream).
func TestStoppedReaderBudgetAndStall(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		for _, messagesFirst := range []bool{false, true} {
			name := "stream"
			if messagesFirst {
				name = "messages_then_stream"
			}
			t.Run(name, func(t *testing.T) { stoppedReaders(t, plane, messagesFirst) })
		}
	})
}

// stoppedReadersGo ends the request/response phase of stoppedReaders: the
// backend streams from then on.
var stoppedReadersGo = []byte("go")

func stoppedReaders(t *testing.T, plane string, messagesFirst bool) {
	topo := nettest.NewTopology(t)
	const conns, budgetMiB = 8, 16
	const stall = 2 * time.Second
	type writerEnd struct {
		at      time.Time
		written int64
		err     error
	}
	ends := make(chan writerEnd, conns)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
		if messagesFirst {
			// Echo 64-byte messages until one starts with "go".
			msg := make([]byte, 64)
			for {
				if _, err := io.ReadFull(c, msg); err != nil {
					return
				}
				if bytes.HasPrefix(msg, stoppedReadersGo) {
					break
				}
				if _, err := c.Write(msg); err != nil {
					return
				}
			}
		}
		_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		n, err := io.Copy(struct{ io.Writer }{c}, nettest.NewStream(1))
		ends <- writerEnd{time.Now(), n, err}
	})
	p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, adminEnv,
		fmt.Sprintf("EDGEPROXY_MAX_BUFFERED_MB=%d", budgetMiB),
		fmt.Sprintf("EDGEPROXY_STALL_TIMEOUT_SECS=%d", int(stall/time.Second)),
		"EDGEPROXY_HEALTH_INTERVAL_SECS=0")
	baseGlobal := tcpMemPages(t)

	var clients []*net.TCPConn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := range conns {
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		clients = append(clients, c)
	}
	if messagesFirst {
		exchangeMessages(t, clients, 60*time.Millisecond)
		if s, pr := p.mapEntries(t); plane == "sockmap" && (s != 2*conns || pr != 2*conns) {
			t.Fatalf("after 60 ms of messages: %d sockhash entries and %d pairings, want %d each (every connection paired)", s, pr, 2*conns)
		}
		for i, c := range clients {
			msg := make([]byte, 64)
			copy(msg, stoppedReadersGo)
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("connection %d: start the stream: %v", i, err)
			}
		}
	}
	connected := time.Now()

	// Sample until every writer ended or the bound passed. The
	// machine's TCP memory less what the client and backend hosts
	// queue estimates the proxy's share, sockmap's own queues
	// included; other work on the machine moves it too, so it is
	// logged, not asserted.
	sweep := max(time.Second, stall/4)
	bound := stall + sweep + 3*time.Second
	var maxParked, maxQueued, maxShare int
	var atMax tcpSockets // the sample with the most parked
	var got []writerEnd
	for time.Since(connected) < bound && len(got) < conns {
		prx := ssTCP(t, topo.Proxy, 9000)
		others := ssTCP(t, topo.Client, 9000).queued + ssTCP(t, topo.Backend, 9000).queued
		if prx.parked > maxParked {
			maxParked, atMax = prx.parked, prx
		}
		maxQueued = max(maxQueued, prx.queued)
		maxShare = max(maxShare, (tcpMemPages(t)-baseGlobal)*4096-others)
	drain:
		for {
			select {
			case e := <-ends:
				got = append(got, e)
			default:
				break drain
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%s: %d stopped readers: the proxy held up to %d KiB of payload; its socket queues up to %d KiB of memory; the machine's TCP memory less the client's and backends' queues grew by up to %d KiB",
		plane, conns, maxParked>>10, maxQueued>>10, maxShare>>10)
	t.Logf("%s: of the %d KiB held at most, %d KiB waited in the Recv-Q of sockets to backends, %d KiB in the Send-Q of sockets to clients, %d KiB elsewhere (psock queues or pipes)",
		plane, atMax.parked>>10, atMax.backendRecvQ>>10, atMax.clientSendQ>>10, (atMax.parked-atMax.backendRecvQ-atMax.clientSendQ)>>10)

	// The budget bounds what is parked before directions pause; what
	// the backends had in flight then still lands. Allow 2 MiB of that
	// per connection: 16 + 8x2 = 32 MiB, where a per-connection pause
	// at 32 MiB lets 8 stopped readers park 256 MiB.
	// The splice plane holds the same bound through each socket's
	// receive buffer, capped at its share when the connection starts.
	// The sockmap plane decides pauses on its 5 ms tick, so one tick of
	// growth at line rate (10 Gbit/s: 6.25 MB, 8 MiB here) can land
	// beyond the shares before the pauses do.
	const tickAtLineRate = 8 << 20
	if limit := budgetMiB<<20 + conns*2<<20 + tickAtLineRate; maxParked > limit {
		t.Errorf("the proxy held up to %d KiB for %d stopped readers, want at most %d KiB (the %d MiB budget + 2 MiB in flight per connection + one tick at line rate)",
			maxParked>>10, conns, limit>>10, budgetMiB)
	}
	// Each skb's truesize is up to about twice its payload on veth.
	if limit := 2 * (budgetMiB<<20 + conns*2<<20); maxQueued > limit {
		t.Errorf("the proxy's socket queues took up to %d KiB of kernel memory for %d stopped readers, want at most %d KiB (twice the payload bound for skb overhead)",
			maxQueued>>10, conns, limit>>10)
	}

	if len(got) < conns {
		t.Fatalf("%d of %d backends still writing %s after the clients stopped reading; want each reset within %s (stall %s + sweep %s + 3s)",
			conns-len(got), conns, time.Since(connected).Round(10*time.Millisecond), bound, stall, sweep)
	}
	for i, e := range got {
		after := e.at.Sub(connected)
		t.Logf("backend writer %d ended %s after connect, %d KiB written: %v", i, after.Round(10*time.Millisecond), e.written>>10, e.err)
		if after < stall*3/4 {
			t.Errorf("backend writer %d ended %s after connect, before the %s stall timeout: %v", i, after.Round(10*time.Millisecond), stall, e.err)
		}
		if e.err == nil || isTimeout(e.err) {
			t.Errorf("backend writer %d ended with %v, want a reset", i, e.err)
		}
	}
	for i, c := range clients {
		err, ended := endedBy(c, 2*time.Second)
		if !ended || !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("client %d (stopped reading): after reading what was queued, %v (ended %v); want a reset", i, err, ended)
		}
	}
	waitActive(t, topo.Proxy, 0, 2*time.Second, "no connection left")
}

// exchangeMessages has every client send 64-byte messages and read each
// echo back, byte-exact, for d.
func exchangeMessages(t *testing.T, clients []*net.TCPConn, d time.Duration) {
	t.Helper()
	msg, back := make([]byte, 64), make([]byte, 64)
	for end, round := time.Now().Add(d), 0; time.Now().Before(end); round++ {
		for i, c := range clients {
			for j := range msg {
				msg[j] = byte('a' + (i+round+j)%26)
			}
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("connection %d: message %d: %v", i, round, err)
			}
			if _, err := io.ReadFull(c, back); err != nil {
				t.Fatalf("connection %d: echo of message %d: %v", i, round, err)
			}
			if !bytes.Equal(msg, back) {
				t.Fatalf("connection %d: echo of message %d is %q, want %q", i, round, back, msg)
			}
			_ = c.SetDeadline(time.Time{})
		}
	}
}

// TestIdleTimeoutSparesSlowReader: a download whose client reads slowly
// is not idle, though the proxy reads nothing from the backend while the
// client drains what the proxy holds (on the sockmap plane a 1 MiB pipe of
// a streaming direction): with a 1 s idle timeout, a client reading 16 KiB
// every 200 ms for 3 s still gets every byte, then EOF.
func TestIdleTimeoutSparesSlowReader(t *testing.T) {
	forEachPlane(t, func(t *testing.T, plane string) {
		topo := nettest.NewTopology(t)
		const size = 2 << 20
		nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
			_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.CopyN(struct{ io.Writer }{c}, nettest.NewStream(5), size); err != nil {
				return
			}
			_ = c.CloseWrite()
			_, _ = io.Copy(io.Discard, c)
		})
		startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)},
			"EDGEPROXY_IDLE_TIMEOUT_SECS=1", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")

		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// A small receive window keeps most of the download in the proxy.
		if err := c.SetReadBuffer(16 << 10); err != nil {
			t.Fatal(err)
		}
		want := nettest.NewStream(5)
		buf, exp := make([]byte, 16<<10), make([]byte, 16<<10)
		var got int
		slowUntil := time.Now().Add(3 * time.Second)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		for {
			n, err := c.Read(buf)
			if n > 0 {
				_, _ = io.ReadFull(want, exp[:n])
				if !bytes.Equal(buf[:n], exp[:n]) {
					t.Fatalf("byte %d onwards differs from what the backend sent", got)
				}
				got += n
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("after %d of %d bytes: %v", got, size, err)
			}
			if time.Now().Before(slowUntil) {
				time.Sleep(200 * time.Millisecond)
			}
		}
		if got != size {
			t.Fatalf("%s: the slow reader got %d of %d bytes, then EOF: the idle timeout cut the download", plane, got, size)
		}
	})
}
