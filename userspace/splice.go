package userspace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// splicePlane copies each connection with io.Copy between *net.TCPConn,
// which the Go runtime turns into splice(2): no payload crosses userspace,
// but every connection costs two goroutines and two pipes.
type splicePlane struct {
	env    planeEnv
	active atomic.Int64
	// Dial is the backend dialer; a seam for tests.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func newSplicePlane(env planeEnv) *splicePlane {
	d := &net.Dialer{KeepAliveConfig: keepaliveConfig(env.keepalive)}
	if env.keepalive <= 0 {
		d.KeepAlive = -1
	}
	return &splicePlane{env: env, Dial: d.DialContext}
}

// keepaliveConfig is EDGEPROXY_KEEPALIVE_SECS in the Go runtime's terms.
func keepaliveConfig(idle time.Duration) net.KeepAliveConfig {
	if idle <= 0 {
		return net.KeepAliveConfig{Enable: false}
	}
	return net.KeepAliveConfig{Enable: true, Idle: idle, Interval: keepaliveInterval(idle), Count: keepaliveProbes}
}

func (p *splicePlane) Name() string { return "splice" }

func (p *splicePlane) Stats() PlaneStats { return PlaneStats{Active: int(p.active.Load())} }

func (p *splicePlane) Serve(accept, stop context.Context, ln *net.TCPListener) error {
	var wg sync.WaitGroup
	conns := newConnSet()
	stopAccept := context.AfterFunc(accept, func() { ln.Close() })
	defer stopAccept()
	stopAll := context.AfterFunc(stop, conns.closeAll)
	defer stopAll()
	if p.env.idleTimeout > 0 || p.env.stallTimeout > 0 {
		sweepCtx, cancel := context.WithCancel(stop)
		defer cancel()
		go p.sweepLoop(sweepCtx, conns)
	}
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if accept.Err() != nil {
				wg.Wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors and similar: back off, keep serving.
			p.env.warn.Warn("accept", "accept failed, pausing accepts", "err", err, "pause", acceptPause)
			time.Sleep(acceptPause)
			continue
		}
		clientAddr := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		release, reject := p.env.admission.admit(clientAddr.Addr())
		if release == nil {
			p.env.log.Debug("client refused", "client", clientAddr, "reason", reject)
			c.SetLinger(0)
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer release()
			p.handle(stop, c, clientAddr, conns)
		}()
	}
}

// handle owns client from here on: it is closed before handle returns.
func (p *splicePlane) handle(ctx context.Context, client *net.TCPConn, clientAddr netip.AddrPort, conns *connSet) {
	start := time.Now()
	_ = client.SetKeepAliveConfig(keepaliveConfig(p.env.keepalive))
	lease, reject := p.env.balancer.Acquire(clientAddr.Addr())
	if lease == nil {
		p.env.log.Debug("client rejected", "client", clientAddr, "reason", reject)
		client.SetLinger(0)
		client.Close()
		return
	}
	defer func() { lease.Release() }() // the lease that answered, after retries
	p.env.logOpen("splice", clientAddr, lease)
	p.active.Add(1)
	defer p.active.Add(-1)

	backend, end := p.dialWithRetries(ctx, clientAddr, &lease, start)
	if backend == nil {
		client.SetLinger(0)
		client.Close()
		p.env.onClose(ConnSummary{Client: clientAddr, Backend: lease.Backend.ID, Duration: time.Since(start), End: end})
		return
	}
	lease.Connected()
	if limit := p.receiveLimit(); limit > 0 {
		// Bytes a stopped reader's peer keeps sending park in the receive
		// queue of the socket they arrive on: cap it at this connection's
		// share of the buffer budget (the kernel doubles the value).
		_ = client.SetReadBuffer(limit / 2)
		_ = backend.SetReadBuffer(limit / 2)
	}
	sc := &spliceConn{client: client, backend: backend}
	conns.add(sc)
	defer conns.remove(sc)

	in, out, end := spliceBoth(client, backend)
	if sc.closedFor != "" {
		end = sc.closedFor
	}
	lease.state.bytesIn.Add(uint64(in))
	lease.state.bytesOut.Add(uint64(out))
	p.env.onClose(ConnSummary{Client: clientAddr, Backend: lease.Backend.ID, BytesIn: uint64(in), BytesOut: uint64(out), Duration: time.Since(start), End: end})
}

// dialWithRetries dials the lease's backend and, when that fails, the
// next best ones, within the connect timeout for all attempts together.
// *lease is the lease of the backend that answered, or of the last that
// failed. Bytes the client sends meanwhile stay in its socket until the
// copy starts, so the backend that answers gets them all.
func (p *splicePlane) dialWithRetries(ctx context.Context, clientAddr netip.AddrPort, lease **Lease, start time.Time) (*net.TCPConn, string) {
	connectBy := start.Add(p.env.connectTimeout)
	for {
		l := *lease
		target := l.Backend.AddrPort()
		now := time.Now()
		dctx, cancel := context.WithTimeout(ctx, attemptTimeout(connectBy, now, l.AttemptsLeft(p.env.retries)))
		bc, err := p.Dial(dctx, "tcp", target.String())
		cancel()
		if err == nil {
			return bc.(*net.TCPConn), ""
		}
		if ctx.Err() != nil {
			return nil, "shutdown"
		}
		if localExhaustion(err) {
			p.env.balancer.countReject(RejectMaxConns)
			p.env.warn.Warn("exhausted", "refusing client: this host is out of descriptors or buffers", "client", clientAddr, "err", err)
			return nil, "max_conns"
		}
		l.Failed(err)
		p.env.warn.Warn("dial:"+l.Backend.ID, "dial backend failed", "client", clientAddr, "backend", l.Backend.ID,
			"addr", target, "attempt", l.Attempts(), "err", err)
		if l.Attempts() > p.env.retries || !time.Now().Before(connectBy) {
			p.env.balancer.countReject(RejectAllDialsFailed)
			return nil, "connect_failed"
		}
		next, _ := p.env.balancer.AcquireNext(l)
		if next == nil {
			return nil, "connect_failed"
		}
		*lease = next
		p.env.logOpen("splice", clientAddr, next)
	}
}

// minReceiveLimit keeps a capped receive buffer large enough for a LAN's
// bandwidth-delay product.
const minReceiveLimit = 256 << 10

// receiveLimit is one direction's share of the buffer budget
// (EDGEPROXY_MAX_BUFFERED_MB) for its receive queue, or 0
// when the share is above what autotuning would reach anyway (tcp_rmem's
// maximum): then the kernel's own tuning is kept. A direction's bytes wait
// in the receive queue of the socket they arrive on while its reader is
// slow, so with every connection at its share all of them park at most the
// budget there.
func (p *splicePlane) receiveLimit() int {
	if p.env.bufferBudget == 0 {
		return 0
	}
	share := p.env.bufferBudget / uint64(max(2*p.active.Load(), 1))
	// A direction's bytes wait in two queues, the receive queue they
	// arrive in and the send queue they leave by: half the share each.
	limit := share / 2
	if limit >= uint64(tcpRmemMax()) {
		return 0
	}
	return int(max(limit, minReceiveLimit))
}

var (
	tcpRmemOnce sync.Once
	tcpRmemVal  int
)

// tcpRmemMax is the largest receive buffer autotuning gives a socket
// (net.ipv4.tcp_rmem's third field); 6 MiB, Linux's default, when unread.
func tcpRmemMax() int {
	tcpRmemOnce.Do(func() {
		tcpRmemVal = 6 << 20
		b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
		if err != nil {
			return
		}
		if f := strings.Fields(string(b)); len(f) == 3 {
			if n, err := strconv.Atoi(f[2]); err == nil && n > 0 {
				tcpRmemVal = n
			}
		}
	})
	return tcpRmemVal
}

// spliceBoth runs both copy loops until each direction has ended, then
// closes both connections. A reset on either side resets the other.
func spliceBoth(client, backend *net.TCPConn) (in, out int64, end string) {
	type result struct {
		toBackend bool
		n         int64
		err       error
	}
	results := make(chan result, 2)
	go func() {
		n, err := copyClientToBackend(backend, client)
		results <- result{true, n, err}
	}()
	go func() {
		n, err := copyBackendToClient(client, backend)
		results <- result{false, n, err}
	}()
	end = "closed"
	for range 2 {
		r := <-results
		if r.toBackend {
			in = r.n
		} else {
			out = r.n
		}
		if r.err != nil && end != "reset" {
			// The other loop may be blocked reading a side that will never
			// speak again: reset both so it returns at once.
			abort(client, backend)
			end = "reset"
		}
	}
	client.Close()
	backend.Close()
	return in, out, end
}

func copyClientToBackend(backend, client *net.TCPConn) (int64, error) {
	return copyHalf(backend, client)
}

func copyBackendToClient(client, backend *net.TCPConn) (int64, error) {
	return copyHalf(client, backend)
}

// copyHalf copies until src's EOF, then half-closes dst so the far side
// sees the FIN and can still send its reply.
func copyHalf(dst, src *net.TCPConn) (int64, error) {
	n, err := io.Copy(dst, src)
	if err != nil {
		return n, fmt.Errorf("copy %s -> %s: %w", src.RemoteAddr(), dst.RemoteAddr(), err)
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, fmt.Errorf("half-close %s: %w", dst.RemoteAddr(), err)
	}
	return n, nil
}

// abort resets both connections: linger 0 makes close send RST, which is
// how a reset on one side reaches the other.
func abort(a, b *net.TCPConn) {
	a.SetLinger(0)
	b.SetLinger(0)
	a.Close()
	b.Close()
}

// spliceConn is one spliced pair, as the sweep sees it.
type spliceConn struct {
	client, backend *net.TCPConn
	// Written by the sweep only.
	stallAcked [2]uint64
	stallSince [2]time.Time
	closedFor  string // set before the sweep closes the pair
}

// connSet tracks live connections so shutdown can close them.
type connSet struct {
	mu sync.Mutex
	m  map[*spliceConn]struct{}
}

func newConnSet() *connSet { return &connSet{m: map[*spliceConn]struct{}{}} }

func (s *connSet) add(c *spliceConn) {
	s.mu.Lock()
	s.m[c] = struct{}{}
	s.mu.Unlock()
}

func (s *connSet) remove(c *spliceConn) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	for c := range s.m {
		c.client.Close()
		c.backend.Close()
	}
	s.mu.Unlock()
}

func (s *connSet) list() []*spliceConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*spliceConn, 0, len(s.m))
	for c := range s.m {
		out = append(out, c)
	}
	return out
}

// sweepLoop closes pairs idle both ways for the idle timeout and resets
// pairs with a direction stalled for the stall timeout. The kernel keeps
// both clocks: TCP_INFO's time since data was last received on each
// socket, and its acknowledged byte count.
func (p *splicePlane) sweepLoop(ctx context.Context, conns *connSet) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var nextStall time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			stallDue := p.env.stallTimeout > 0 && !now.Before(nextStall)
			if stallDue {
				nextStall = now.Add(stallSweepPeriod(p.env.stallTimeout))
			}
			for _, c := range conns.list() {
				p.sweepConn(c, now, stallDue)
			}
		}
	}
}

func (p *splicePlane) sweepConn(c *spliceConn, now time.Time, stallDue bool) {
	var infos [2]*unix.TCPInfo
	var outq [2]int
	for i, tc := range []*net.TCPConn{c.client, c.backend} {
		raw, err := tc.SyscallConn()
		if err != nil {
			return
		}
		_ = raw.Control(func(fd uintptr) {
			infos[i], _ = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
			outq[i], _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
		})
		if infos[i] == nil {
			return
		}
	}
	if idle := p.env.idleTimeout; idle > 0 {
		quiet := func(ti *unix.TCPInfo) bool { return time.Duration(ti.Last_data_recv)*time.Millisecond >= idle }
		if quiet(infos[0]) && quiet(infos[1]) && outq[0] == 0 && outq[1] == 0 {
			c.closedFor = "idle_timeout"
			c.client.Close()
			c.backend.Close()
			return
		}
	}
	if !stallDue {
		return
	}
	for i := range infos {
		acked := infos[i].Bytes_acked
		if outq[i] == 0 || acked != c.stallAcked[i] || c.stallSince[i].IsZero() {
			c.stallAcked[i], c.stallSince[i] = acked, now
			continue
		}
		if now.Sub(c.stallSince[i]) >= p.env.stallTimeout {
			p.env.warn.Warn("stall", "resetting a stalled connection: its receiver took no byte",
				"client", c.client.RemoteAddr(), "stall_timeout", p.env.stallTimeout)
			c.closedFor = "stalled"
			abort(c.client, c.backend)
			return
		}
	}
}
