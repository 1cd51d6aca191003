//go:build linux

package userspace

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"golang.org/x/sys/unix"
)

// connPhase is where a connection of the sockmap plane stands as a whole;
// each of its two directions has its own directionState within it.
type connPhase uint8

const (
	// connDialling: the backend connect is in flight (a retry to another
	// backend stays in this phase).
	connDialling connPhase = iota
	// connUnpaired: the backend answered; userspace moves both
	// directions (a streaming one by splice through a pipe) until the
	// connection lived pairAfterAge, then pairs it unless it streams.
	// Most connections end here, never paired.
	connUnpaired
	// connSpliced: both sockets are in the sockhash; the kernel moves the
	// bytes of every armed direction.
	connSpliced
	// connCopying: a socket was half-closed when the connection was
	// paired, so the sockhash refused it; userspace copies both
	// directions to the end.
	connCopying
	// connClosed: torn down; descriptors, slot and lease given back.
	connClosed
)

var connPhaseNames = [...]string{
	connDialling: "dialling",
	connUnpaired: "unpaired",
	connSpliced:  "spliced",
	connCopying:  "copying",
	connClosed:   "closed",
}

func (ph connPhase) String() string {
	if int(ph) < len(connPhaseNames) {
		return connPhaseNames[ph]
	}
	return fmt.Sprintf("connPhase(%d)", ph)
}

// connPhaseSteps is every legal change of phase: forward only, and any
// phase may end.
var connPhaseSteps = map[connPhase][]connPhase{
	connDialling: {connUnpaired, connClosed},
	connUnpaired: {connSpliced, connCopying, connClosed},
	connSpliced:  {connClosed},
	connCopying:  {connClosed},
}

var errIllegalPhase = errors.New("illegal connection phase change")

// enter moves the connection to phase next, the only writer of c.phase,
// or refuses a change connPhaseSteps does not list.
func (c *smConn) enter(next connPhase) error {
	for _, legal := range connPhaseSteps[c.phase] {
		if legal == next {
			c.phase = next
			return nil
		}
	}
	return fmt.Errorf("%w: %s to %s", errIllegalPhase, c.phase, next)
}

// endpoint is one socket of a connection. The direction embedded in it is
// the flow of bytes this socket receives (forwarded to peer).
type endpoint struct {
	direction
	conn   *smConn
	peer   *endpoint
	fd     int
	cookie uint64
	flow   *uint64 // flow word shared with the verdict: armed bit | byte count
	// base is what TCP_INFO counts as sent before any payload: the SYN
	// for the socket we connected, nothing for the accepted one.
	base uint64
	// events is what the socket is registered for in epoll, 0 when not
	// registered: a change of interest costs a system call only when it
	// changes this.
	events uint32
	// hangup remembers that epoll reported RDHUP, HUP or ERR, so EOF is
	// worth probing for. It is not part of the direction's state: it is
	// what edge-triggered epoll said once and will not say again.
	hangup bool

	// sweptCount is the flow count at the last idle sweep; stallAcked and
	// stallSince track what the remote of this socket acknowledged, for
	// the stall check of the direction that ends here.
	sweptCount uint64
	stallAcked uint64
	stallSince time.Time
}

type smConn struct {
	phase           connPhase
	client, backend endpoint
	lease           *Lease
	release         func() // gives back the admission slot
	clientAddr      netip.AddrPort
	origin          clientOrigin // who it serves, per a PROXY header if one came
	// earlySent is how many client bytes read behind an inbound header
	// went to the backend ahead of the verdict's count.
	earlySent  uint64
	start      time.Time
	deadline   time.Time // this connect attempt's deadline
	connectBy  time.Time // every attempt's deadline together
	lastActive time.Time // a byte moved either way (idle sweep)
	// pairBy is when a connection still unpaired may be paired
	// (pairAfterAge after the backend answered).
	pairBy time.Time
	// lastRead is when userspace last read bytes of the unpaired
	// connection (the loop's wake-up time). Only a connection talking now
	// gains from pairing (the verdict saves the event loop's wake-up per
	// message); an idle one would only pay for it, a psock and a
	// sockhash entry per socket: 12.0 KiB of kernel memory per idle
	// connection paired against 8.0 unpaired in the bench's idle
	// workload. So it waits unpaired until it talks (talkingWithin).
	lastRead time.Time
	// keepaliveAt is when the backend socket gets its keepalive options,
	// zero once it has them (see keepaliveDelay).
	keepaliveAt time.Time
	// mapSockets and mapPairings are the entries this connection holds in
	// the sockhash and pairings maps, for counts a scrape can read.
	mapSockets, mapPairings int64
}

func (p *sockmapPlane) startConn(cfd int, origin clientOrigin) {
	client := origin.client
	release, reject := p.env.admitOrigin(origin)
	if release == nil {
		p.env.log.Debug("client refused", "client", client, "reason", reject)
		closeWithReset(cfd)
		return
	}
	lease, reject := p.env.balancer.Acquire(client.Addr())
	if lease == nil {
		release()
		p.env.log.Debug("client rejected", "client", client, "reason", reject)
		closeWithReset(cfd)
		return
	}
	p.env.logOpen("sockmap", client, lease)
	now := time.Now()
	c := &smConn{lease: lease, release: release, clientAddr: client, origin: origin, start: now, lastActive: now}
	c.connectBy = now.Add(p.env.connectTimeout)
	if p.env.keepalive > 0 {
		c.keepaliveAt = now.Add(keepaliveDelay(p.env.keepalive))
	}
	c.client = endpoint{conn: c, fd: cfd}
	c.backend = endpoint{conn: c, fd: -1, base: 1}
	c.client.peer, c.backend.peer = &c.backend, &c.client
	p.conns[c] = struct{}{}
	p.counters.active.Add(1)
	p.track(&c.client)
	p.dial(c)
}

// dial starts a non-blocking connect to the lease's backend. Bytes the
// client sends meanwhile wait in its socket's receive queue: the socket
// is not in the sockhash yet, so whichever backend answers gets them.
func (p *sockmapPlane) dial(c *smConn) {
	now := time.Now()
	c.deadline = now.Add(attemptTimeout(c.connectBy, now, c.lease.AttemptsLeft(p.env.retries)))
	target := c.lease.Backend.AddrPort()
	family := unix.AF_INET6
	if target.Addr().Is4() {
		family = unix.AF_INET
	}
	bfd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		p.failConnect(c, fmt.Errorf("create backend socket: %w", err))
		return
	}
	c.backend.fd = bfd
	p.track(&c.backend)
	// Small writes go out at once: the redirect path hands each skb to
	// the peer's send path, and Nagle would hold a ping-pong's reply.
	// (Accepted sockets inherit TCP_NODELAY from the listener; keepalive
	// comes later, see keepaliveDelay.)
	_ = unix.SetsockoptInt(bfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	sa, err := backendSockaddr(target)
	if err != nil {
		p.failConnect(c, err)
		return
	}
	if err := unix.Connect(bfd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		p.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	if err := p.register(&c.backend, unix.EPOLLOUT|unix.EPOLLET); err != nil {
		p.failConnect(c, err)
		return
	}
	p.watch(c)
}

// failConnect handles a dial that did not produce a connection. A dial
// this host could not even start (out of descriptors) is refused as
// max_conns and says nothing about the backend. Otherwise it counts
// against the backend's health and the next best backend is tried, while
// attempts and time are left.
func (p *sockmapPlane) failConnect(c *smConn, err error) {
	if c.backend.fd >= 0 {
		p.byFD[c.backend.fd] = nil
		unix.Close(c.backend.fd)
		c.backend.fd = -1
		c.backend.events = 0
	}
	next, reason, cause := p.env.afterFailedDial("sockmap", c.clientAddr, c.lease, c.connectBy, err)
	if next == nil {
		p.reset(c, reason, cause)
		return
	}
	c.lease = next
	p.dial(c)
}

// finishConnect completes a dial epoll reported on. A plain EPOLLOUT is
// a connect that succeeded: a failed one always carries EPOLLERR (the
// socket's error is set) and EPOLLHUP (it is closed), see tcp_poll; only
// then is SO_ERROR read, for the reason.
func (p *sockmapPlane) finishConnect(c *smConn, events uint32) {
	if events&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		errno, err := unix.GetsockoptInt(c.backend.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err == nil {
			err = unix.Errno(errno)
			if errno == 0 {
				err = errors.New("connection closed by the backend")
			}
		}
		p.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	if p.env.untrustedHeader(c.client.fd, c.origin) {
		c.lease.Connected()
		p.reset(c, "proxy_protocol", "PROXY header from an untrusted peer")
		return
	}
	sent, err := sendProxyHeader(c.backend.fd, c.client.fd, &c.lease.Backend, c.origin)
	if err != nil {
		p.failConnect(c, err)
		return
	}
	// Client bytes read behind an inbound header go next; what the
	// socket does not take now is flushed (forward) before the client's
	// direction is armed, so before any byte the verdict counts.
	early := c.origin.early
	if len(early) > 0 {
		n, err := unix.Write(c.backend.fd, early)
		if errors.Is(err, unix.EAGAIN) {
			n, err = 0, nil
		}
		if err != nil {
			p.failConnect(c, fmt.Errorf("send the client's first bytes to backend %s: %w", c.lease.Backend.ID, err))
			return
		}
		countMoved(&c.backend, n)
		c.client.pending = early[n:]
	}
	// The header and the early bytes go ahead of every byte the verdict
	// counts: TCP_INFO counts them as sent on this socket, so they are
	// part of its base (landed, sentTo and the stall check subtract it;
	// counted as the verdict's, the FIN could overtake its last bytes).
	c.backend.base = 1 + uint64(sent) + uint64(len(early))
	c.earlySent = uint64(len(early))
	c.lease.Connected()
	if err := p.startCopying(c); err != nil {
		p.reset(c, "reset", err.Error())
		return
	}
	if p.forward(&c.client) && p.forward(&c.backend) {
		p.settle(c)
	}
}

// startCopying has userspace copy a connection whose backend answered,
// until pairLate finds it worth pairing.
func (p *sockmapPlane) startCopying(c *smConn) error {
	if err := c.enter(connUnpaired); err != nil {
		return err
	}
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if err := ep.transition(evConnected); err != nil {
			return err
		}
	}
	c.pairBy = time.Now().Add(pairAfterAge)
	if err := p.register(&c.backend, epollIn); err != nil {
		return err
	}
	return p.register(&c.client, epollIn)
}

// pairLate moves a connection that lived pairAfterAge without streaming
// into the sockhash, so the kernel splices the
// rest. Byte order holds because every byte userspace read is in the
// peer's send queue before the insert (drainCopy), and bytes that arrive
// after the last read wait in the source's queue: once the socket is in
// the sockhash the kick runs the verdict over them, unarmed, so they are
// counted and caught up before the direction arms, as at any pairing. A
// connection whose direction ended, or whose peer is full, is not paired
// now: the first copies to the end, the second is retried on the next
// tick or EPOLLOUT. It returns false when the connection was torn down.
func (p *sockmapPlane) pairLate(c *smConn) bool {
	if c.phase != connUnpaired || c.client.state != dirUnpaired || c.backend.state != dirUnpaired {
		return true
	}
	for _, src := range []*endpoint{&c.client, &c.backend} {
		drained, alive := p.drainCopy(src)
		if !alive {
			return false
		}
		if !drained {
			return true
		}
	}
	if c.client.streaming || c.backend.streaming {
		// The drain just filled a read: a stream began since the tick
		// judged the window.
		return true
	}
	if err := p.pair(c); err != nil {
		p.env.log.Error("pair sockets failed", "client", c.clientAddr, "backend", c.lease.Backend.ID, "err", err)
		p.reset(c, "pair_failed", err.Error())
		return false
	}
	return p.forward(&c.client) && p.forward(&c.backend)
}

// pair puts both sockets of a connection userspace copied so far into
// the sockhash, unarmed, every byte read already written to the peer.
// Both are kicked: bytes that arrived after userspace's last read wait in
// the socket's queue, unseen by the verdict until more arrive, which a
// request/response peer may never do.
func (p *sockmapPlane) pair(c *smConn) error {
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		cookie, err := unix.GetsockoptUint64(ep.fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return fmt.Errorf("read socket cookie: %w", err)
		}
		ep.cookie = cookie
	}
	phase, ev := connSpliced, evPaired
	err := p.maps.Pair(loader.Pair{
		ClientFD: c.client.fd, BackendFD: c.backend.fd,
		ClientCookie: c.client.cookie, BackendCookie: c.backend.cookie,
		Backend: c.lease.state.index,
	})
	switch {
	case err == nil:
		c.mapSockets, c.mapPairings = 2, 2
	case errors.Is(err, loader.ErrClientStaysPaired):
		// Its pairings and flow slots go with the connection's unpair,
		// whether it is copied on or torn down.
		c.mapSockets, c.mapPairings = 1, 2
	}
	p.counters.pairedSockets.Add(c.mapSockets)
	p.counters.pairings.Add(c.mapPairings)
	if err != nil {
		if !errors.Is(err, loader.ErrNotEstablished) {
			return err
		}
		// A remote that sent FIN after userspace's last read: the
		// connection is nearly over, userspace copies the rest.
		phase, ev = connCopying, evPairedForCopy
		p.env.log.Debug("socket half-closed before pairing, copying in userspace",
			"client", c.clientAddr, "backend", c.lease.Backend.ID, "err", err)
	} else {
		// The verdict counts from zero: what userspace copied so far is,
		// to TCP_INFO on the peer, sent ahead of every counted byte, as
		// the PROXY header and early bytes are.
		for _, src := range []*endpoint{&c.client, &c.backend} {
			src.flow = p.maps.FlowState(src.fd)
			src.copied, src.settled = src.settled, 0
			src.peer.base += src.copied
		}
	}
	if err := c.enter(phase); err != nil {
		return err
	}
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if err := ep.transition(ev); err != nil {
			return err
		}
	}
	if err := p.register(&c.backend, epollIn); err != nil {
		return err
	}
	if err := p.register(&c.client, epollIn); err != nil {
		return err
	}
	// Copying or not, bytes queued before insertion must go through the
	// verdict before later ones.
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if err := kick(ep.fd); err != nil {
			return err
		}
	}
	return nil
}

// settle propagates FINs whose bytes have all reached the peer's send
// queue, and closes the connection once both directions are done. The
// last FIN is sent by closing the socket (an orderly close sends FIN after
// the send queue, as shutdown does): one system call fewer.
func (p *sockmapPlane) settle(c *smConn) {
	waiting := false
	for _, src := range []*endpoint{&c.client, &c.backend} {
		dst := src.peer
		if src.state != dirDraining {
			continue
		}
		if len(src.pending) > 0 || src.inPipe > 0 {
			waiting = true
			continue
		}
		if src.redirected {
			done, err := landed(dst, src.final)
			if err != nil {
				p.reset(c, "reset", "read peer send queue")
				return
			}
			if !done {
				waiting = true
				continue
			}
		}
		if dst.state != dirClosed {
			if err := unix.Shutdown(dst.fd, unix.SHUT_WR); err != nil {
				p.reset(c, "reset", "half-close peer")
				return
			}
		}
		if !p.step(src, evFINSent) {
			return
		}
	}
	if c.client.state == dirClosed && c.backend.state == dirClosed {
		p.finish(c, "closed")
		return
	}
	if waiting {
		p.watch(c)
	}
}

// landed reports whether the first n payload bytes have entered ep's send
// queue. Acknowledged is enough, and usually so by the time a FIN follows
// a reply, so SIOCOUTQ is asked only when TCP_INFO alone falls short.
func landed(ep *endpoint, n uint64) (bool, error) {
	info, err := unix.GetsockoptTCPInfo(ep.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return false, fmt.Errorf("tcp info: %w", err)
	}
	if info.Bytes_acked-min(info.Bytes_acked, ep.base) >= n {
		return true, nil
	}
	outq, err := unix.IoctlGetInt(ep.fd, unix.SIOCOUTQ)
	if err != nil {
		return false, fmt.Errorf("outq: %w", err)
	}
	return info.Bytes_acked+uint64(outq)-ep.base >= n, nil
}

// sentTo is how many payload bytes have entered ep's send queue, counted
// by sequence numbers: acknowledged plus still queued, minus the SYN.
func sentTo(ep *endpoint) (uint64, error) {
	info, err := unix.GetsockoptTCPInfo(ep.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, fmt.Errorf("tcp info: %w", err)
	}
	outq, err := unix.IoctlGetInt(ep.fd, unix.SIOCOUTQ)
	if err != nil {
		return 0, fmt.Errorf("outq: %w", err)
	}
	return info.Bytes_acked + uint64(outq) - ep.base, nil
}

// stalled reports whether a direction of c has bytes its receiver has not
// acknowledged and acknowledged nothing for the stall timeout.
func (p *sockmapPlane) stalled(c *smConn, now time.Time) bool {
	for _, dst := range []*endpoint{&c.client, &c.backend} {
		src := dst.peer
		info, err := unix.GetsockoptTCPInfo(dst.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			continue
		}
		acked := info.Bytes_acked
		delivered := acked - min(acked, dst.base)
		if src.settledTotal() <= delivered || acked != dst.stallAcked || dst.stallSince.IsZero() {
			dst.stallAcked, dst.stallSince = acked, now
			continue
		}
		if now.Sub(dst.stallSince) >= p.env.stallTimeout {
			return true
		}
	}
	return false
}

// finishIdle closes an idle connection: nothing is in flight, so both
// remotes see an orderly FIN.
func (p *sockmapPlane) finishIdle(c *smConn) {
	p.teardown(c, false, "idle_timeout")
}

// finish ends a connection whose directions both completed.
func (p *sockmapPlane) finish(c *smConn, how string) {
	p.teardown(c, false, how)
}

// reset ends a connection at once; both remotes see RST.
func (p *sockmapPlane) reset(c *smConn, how, cause string) {
	p.resetAfter(c, nil, how, cause)
}

// resetAfter resets c after its socket dead was reset by its remote: that
// socket is closed plainly (nothing is left to tell its remote), the other
// with RST.
func (p *sockmapPlane) resetAfter(c *smConn, dead *endpoint, how, cause string) {
	if c.phase != connClosed {
		p.env.log.Debug("connection aborted", "client", c.clientAddr, "backend", c.lease.Backend.ID, "cause", cause)
	}
	p.teardownExcept(c, true, dead, how)
}

func (p *sockmapPlane) teardown(c *smConn, hard bool, how string) {
	p.teardownExcept(c, hard, nil, how)
}

// teardownExcept ends c, closing its sockets with RST when hard, except
// dead, which is closed plainly. The pairing entries are deleted with the
// next batch (flushUnpairs): the sockets leave the sockhash as they close.
func (p *sockmapPlane) teardownExcept(c *smConn, hard bool, dead *endpoint, how string) {
	if c.phase == connClosed {
		return
	}
	paired := c.phase != connDialling
	if err := c.enter(connClosed); err != nil {
		// Every phase may end; this cannot fail, but say so if it does.
		p.env.log.Error("sockmap plane bug", "client", c.clientAddr, "err", err)
	}
	delete(p.conns, c)
	delete(p.recheck, c)
	p.counters.active.Add(-1)
	p.counters.pairedSockets.Add(-c.mapSockets)
	// The fd numbers name the flow slots Unpair releases (if their
	// sockets still own them when the batch runs).
	clientSlot, backendSlot := c.client.fd, c.backend.fd
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if ep.fd < 0 {
			continue
		}
		p.byFD[ep.fd] = nil
		p.returnPipe(ep)
		if hard && ep != dead {
			closeWithReset(ep.fd)
		} else {
			unix.Close(ep.fd)
		}
	}
	if paired && c.mapPairings > 0 {
		p.queueUnpair(loader.Pair{ClientCookie: c.client.cookie, BackendCookie: c.backend.cookie,
			ClientFD: clientSlot, BackendFD: backendSlot})
	}
	c.lease.Release()
	c.release()
	in := c.earlySent + c.client.copied + c.client.settledTotal()
	out := c.backend.copied + c.backend.settledTotal()
	p.env.onClose(ConnSummary{
		Client: c.clientAddr, Backend: c.lease.Backend.ID,
		BytesIn: in, BytesOut: out, Duration: time.Since(c.start), End: how, Dataplane: "sockmap",
	})
}

// holdsBytes reports whether userspace holds bytes of c that a remote has
// not taken yet: pending or in a pipe.
func (c *smConn) holdsBytes() bool {
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if len(ep.pending) > 0 || ep.inPipe > 0 {
			return true
		}
	}
	return false
}

// returnPipe gives back the pipe of ep's direction when it ends: to the
// pool when empty, closed with what it holds otherwise.
func (p *sockmapPlane) returnPipe(ep *endpoint) {
	if ep.pipe == nil {
		return
	}
	p.pipes.release(ep.pipe, ep.inPipe)
	ep.pipe, ep.inPipe = nil, 0
}

func (ep *endpoint) side() string {
	if ep == &ep.conn.client {
		return "client"
	}
	return "backend"
}

// describe is the endpoint's forwarding state, for debug logs.
func (ep *endpoint) describe() string {
	var word uint64
	if ep.flow != nil {
		word = atomic.LoadUint64(ep.flow)
	}
	sent, _ := sentTo(ep)
	return fmt.Sprintf("%s socket (direction %s settled=%d count=%d sent_to=%d pending=%d in_pipe=%d; peer direction %s final=%d)",
		ep.side(), ep.state, ep.settled, word&loader.FlowCountMask, sent, len(ep.pending), ep.inPipe, ep.peer.state, ep.peer.final)
}

// keepaliveDelay is how long a backend socket goes without keepalive: a
// connection shorter than that never needs a probe, and most are, so most
// never pay the four setsockopt calls. A dead backend is found at most
// this much later than the idle time says: a second at most, half the
// idle time when that is shorter. (Clients inherit keepalive from the
// listening socket at no cost.)
func keepaliveDelay(idle time.Duration) time.Duration { return min(idle/2, time.Second) }

// setKeepalive turns on TCP keepalive with idle time idle (off when 0):
// a peer that vanished without FIN or RST is then reset by the kernel,
// and the connection and its slot are freed.
func setKeepalive(fd int, idle time.Duration) error {
	if idle <= 0 {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 0)
	}
	for _, o := range []struct{ level, opt, val int }{
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(idle / time.Second)},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(keepaliveInterval(idle) / time.Second)},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepaliveProbes},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.val); err != nil {
			return err
		}
	}
	return nil
}

// backendSockaddr is the address to connect to; an IPv6 link-local
// backend carries its zone (fe80::1%eth0), which names the interface.
func backendSockaddr(ap netip.AddrPort) (unix.Sockaddr, error) {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}, nil
	}
	sa := &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	if zone := ap.Addr().Zone(); zone != "" {
		ifi, err := net.InterfaceByName(zone)
		if err != nil {
			if n, nerr := strconv.Atoi(zone); nerr == nil {
				sa.ZoneId = uint32(n)
				return sa, nil
			}
			return nil, fmt.Errorf("backend %s: zone %q: %w", ap, zone, err)
		}
		sa.ZoneId = uint32(ifi.Index)
	}
	return sa, nil
}

func closeWithReset(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}

// pairingWindow is what an unpaired direction read since the tick last
// decided whether to pair its connection.
type pairingWindow struct {
	reads, bytes uint64
}

func (w *pairingWindow) add(n int) {
	w.reads++
	w.bytes += uint64(n)
}

// streamingNow judges the direction on the window just ended and starts the
// next. A direction streams once a read filled the buffer (more was
// queued than one read takes); it stops streaming when a window's reads
// average under streamReadBytes, and a quiet window changes nothing: a
// download waiting on a slow receiver is still a download.
func (d *direction) streamingNow() bool {
	w := d.window
	d.window = pairingWindow{}
	if d.streaming && w.reads > 0 && w.bytes/w.reads < streamReadBytes {
		d.streaming = false
	}
	return d.streaming
}

// judgeWindow ends the pairing window of both directions of an unpaired
// connection and starts the next; it reports whether a direction is a
// stream, which stays spliced through a pipe instead of being paired. On
// this kernel a stream costs less that way: the psock worker sends each
// redirected skb by itself, each frag a sendmsg of its own without
// MSG_MORE (skb_send_sock, net/core/skbuff.c), so every one is pushed out
// as a segment of its own, and the backend received 2.7 times as many
// segments (21.8 KB each) as through a 1 MiB pipe (59.8 KB each), with a
// machine CPU per GB to match (docs/architecture.md).
func (c *smConn) judgeWindow() (streaming bool) {
	client := c.client.streamingNow()
	backend := c.backend.streamingNow()
	return client || backend
}
