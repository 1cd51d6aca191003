//go:build linux

package userspace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"golang.org/x/sys/unix"
)

// sockmapPlane splices each connection inside the kernel: the verdict
// program redirects every skb a socket receives to its peer's send path.
// One goroutine runs an epoll loop for all connections, from accept to
// close; no goroutine is parked per connection and no payload is copied
// through userspace except bytes that arrive before a direction is armed
// or while it is paused for backpressure.
type sockmapPlane struct {
	env  planeEnv
	maps *loader.Sockmap

	// maxPauseBacklog is the most redirected bytes one direction may have
	// waiting in its peer's psock queue (not yet in the socket's send
	// buffer) before it is paused: the kernel itself puts no bound on that
	// queue. The bound in force is a fair share of the buffer budget over
	// all open directions, never more than this (pauseBacklog).
	maxPauseBacklog uint64
	tick            time.Duration

	epfd, wakefd, lnfd int
	byFD               []*endpoint
	conns              map[*smConn]struct{}
	buf                []byte
	counters           *sockmapCounters // shared by every loop
	accepted           atomic.Uint64    // connections this loop accepted
	// lnEvents is how the listener is registered: EPOLLEXCLUSIVE when
	// several loops wait on it, so one connection wakes one loop.
	lnEvents uint32

	// acceptPausedUntil is set when accept itself failed (out of
	// descriptors): the listener leaves epoll until then, instead of
	// waking the loop for the same error thousands of times a second.
	acceptPausedUntil time.Time
	nextSweep         time.Time // idle and stall checks, once a second
	nextStallSweep    time.Time
}

// sockmapCounters are what every loop of the plane adds to.
type sockmapCounters struct {
	active        atomic.Int64 // connections held, all loops
	pairedSockets atomic.Int64 // sockets put in the sockhash: pair adds, teardown subtracts; Stats reads it instead of walking the map
	pairings      atomic.Int64 // entries written to the pairings map: pair adds, teardown subtracts; Stats reads it instead of walking the map
}

// endpoint is one socket of a connection. Its receive side is the flow of
// bytes it receives (forwarded to peer); its send side is what reaches it.
type endpoint struct {
	conn   *smConn
	peer   *endpoint
	fd     int
	cookie uint64
	state  *uint64 // flow word shared with the verdict: armed bit | byte count
	// base is what TCP_INFO counts as sent before any payload: the SYN
	// for the socket we connected, nothing for the accepted one.
	base uint64

	settled uint64 // bytes received that are forwarded or redirected
	// sweptCount is the flow count at the last idle sweep; stallAcked and
	// stallSince track what the remote of this socket acknowledged, for
	// the stall check of the direction that ends here.
	sweptCount uint64
	stallAcked uint64
	stallSince time.Time
	armed      bool
	paused     bool // disarmed for backpressure: redirected bytes may still be queued
	// clamp is the window clamp to restore once armed, 0 when not clamped.
	// Catching up on passed bytes races the sender, whose window opens as
	// fast as userspace reads; a small window lets userspace win the race.
	clamp int
	// rcvbuf is the receive buffer to restore once armed again, 0 when not
	// shrunk: while paused, bytes wait in this socket's own queue.
	rcvbuf   int
	behind   int    // reads spent catching up since the direction was last armed
	pending  []byte // read from this socket, not yet accepted by peer
	lastSeen uint64 // count at the last backpressure check
	hangup   bool   // epoll reported RDHUP, HUP or ERR: worth probing for EOF
	eof      bool   // the remote sent FIN and every byte before it is counted
	final    uint64 // count at EOF
	shut     bool   // we sent FIN to this socket's remote
	wantOut  bool   // EPOLLOUT registered because peer bytes wait for room
}

type smConn struct {
	client, backend endpoint
	lease           *Lease
	release         func() // gives back the admission slot
	clientAddr      netip.AddrPort
	start           time.Time
	deadline        time.Time // this connect attempt's deadline
	connectBy       time.Time // every attempt's deadline together
	lastActive      time.Time // a byte moved either way (idle sweep)
	connecting      bool
	paired          bool
	// copyMode: a socket was already half-closed when the connection was
	// paired, so the sockhash refused it; userspace copies this one.
	copyMode bool
	watched  bool // re-examined on every tick
	// mapSockets and mapPairings are the entries this connection holds in
	// the sockhash and pairings maps, for counts a scrape can read.
	mapSockets, mapPairings int64
}

const (
	epollIn      = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET
	maxAcceptRun = 256
	readChunk    = 64 << 10
)

// sockmapLoops is the sockmap data plane: EDGEPROXY_WORKERS event loops,
// each accepting from the one listening socket (woken one at a time with
// EPOLLEXCLUSIVE) and owning the connections it accepted, start to end.
// What they share is safe to share: the balancer (its mutex keeps hard
// limits exact across loops), the admission counters, the BPF maps.
type sockmapLoops struct {
	loops    []*sockmapPlane
	maps     *loader.Sockmap
	counters *sockmapCounters
}

func newSockmapPlane(env planeEnv, maps *loader.Sockmap) *sockmapLoops {
	counters := &sockmapCounters{}
	l := &sockmapLoops{maps: maps, counters: counters}
	for range max(env.workers, 1) {
		l.loops = append(l.loops, newSockmapLoop(env, maps, counters))
	}
	return l
}

func newSockmapLoop(env planeEnv, maps *loader.Sockmap, counters *sockmapCounters) *sockmapPlane {
	return &sockmapPlane{
		env:             env,
		maps:            maps,
		counters:        counters,
		maxPauseBacklog: 32 << 20,
		tick:            5 * time.Millisecond,
		conns:           map[*smConn]struct{}{},
		buf:             make([]byte, readChunk),
		lnEvents:        unix.EPOLLIN,
	}
}

func (l *sockmapLoops) Name() string { return "sockmap" }

// Workers is the number of event loops.
func (l *sockmapLoops) Workers() int { return len(l.loops) }

func (l *sockmapLoops) Stats() PlaneStats {
	// Counted in userspace: walking the sockhash or the pairings map would
	// cost a bpf() call per connection on every scrape.
	st := PlaneStats{
		Active:   int(l.counters.active.Load()),
		Sockets:  int(l.counters.pairedSockets.Load()),
		Pairings: int(l.counters.pairings.Load()),
	}
	if v, err := l.maps.Verdicts(); err == nil {
		st.Verdicts = v
	}
	for _, loop := range l.loops {
		st.Accepted = append(st.Accepted, loop.accepted.Load())
	}
	return st
}

// KernelBytes is what the verdict redirected for one backend.
func (l *sockmapLoops) KernelBytes(backend uint32) (toBackend, toClient uint64, err error) {
	return l.maps.BackendBytes(backend)
}

// Serve runs every loop on its own descriptor of the listening socket
// until each has drained. A loop that fails stops the others (their
// connections are reset) and its error is returned.
func (l *sockmapLoops) Serve(accept, stop context.Context, ln *net.TCPListener) error {
	fds, err := dupListener(ln, len(l.loops))
	if err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fds[0], unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		closeAll(fds)
		return fmt.Errorf("set TCP_NODELAY on the listener: %w", err)
	}
	stop, failed := context.WithCancel(stop)
	defer failed()
	errs := make(chan error, len(l.loops))
	for i, loop := range l.loops {
		if len(l.loops) > 1 {
			loop.lnEvents |= unix.EPOLLEXCLUSIVE
		}
		go func() {
			err := loop.serve(accept, stop, fds[i])
			if err != nil {
				failed()
			}
			errs <- err
		}()
	}
	var all []error
	for range l.loops {
		if err := <-errs; err != nil {
			all = append(all, err)
		}
	}
	return errors.Join(all...)
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// serve runs one event loop, accepting on lnfd (its own descriptor of the
// listening socket, closed when it drains). Accepted sockets inherit
// keepalive and TCP_NODELAY from the listening socket (the kernel clones
// it), so clients cost no system call for either.
func (p *sockmapPlane) serve(accept, stop context.Context, lnfd int) error {
	var err error
	p.lnfd = lnfd
	defer func() {
		if p.lnfd >= 0 {
			unix.Close(p.lnfd)
		}
	}()
	if p.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("create epoll: %w", err)
	}
	defer unix.Close(p.epfd)
	if p.wakefd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		return fmt.Errorf("create eventfd: %w", err)
	}
	defer unix.Close(p.wakefd)
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, p.lnfd, p.lnEvents); err != nil {
		return err
	}
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, p.wakefd, unix.EPOLLIN); err != nil {
		return err
	}
	wake := func() { _, _ = unix.Write(p.wakefd, []byte{1, 0, 0, 0, 0, 0, 0, 0}) }
	defer context.AfterFunc(accept, wake)()
	defer context.AfterFunc(stop, wake)()

	events := make([]unix.EpollEvent, 256)
	nextTick := time.Now().Add(p.tick)
	for {
		if accept.Err() != nil && p.lnfd >= 0 {
			// Draining: no new clients; established ones finish.
			unix.Close(p.lnfd)
			p.lnfd = -1
		}
		if stop.Err() != nil {
			for c := range p.conns {
				p.reset(c, "shutdown", "drain ended")
			}
			return nil
		}
		if p.lnfd < 0 && len(p.conns) == 0 {
			return nil
		}
		timeout := -1
		if len(p.conns) > 0 {
			timeout = millisUntil(nextTick)
		}
		if !p.acceptPausedUntil.IsZero() {
			// The listener is out of epoll: wake up to put it back.
			if t := millisUntil(p.acceptPausedUntil); timeout < 0 || t < timeout {
				timeout = t
			}
		}
		n, err := unix.EpollWait(p.epfd, events, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("epoll wait: %w", err)
		}
		for i := range max(n, 0) {
			p.dispatch(int(events[i].Fd), events[i].Events)
		}
		if now := time.Now(); !now.Before(nextTick) {
			p.onTick(now)
			nextTick = now.Add(p.tick)
		}
		if p.lnfd >= 0 && !p.acceptPausedUntil.IsZero() && !time.Now().Before(p.acceptPausedUntil) {
			p.acceptPausedUntil = time.Time{}
			if err := p.epollCtl(unix.EPOLL_CTL_ADD, p.lnfd, p.lnEvents); err != nil {
				return err
			}
		}
	}
}

// millisUntil is an epoll timeout reaching t, rounded up: rounding down
// would wake the loop early and spin until t.
func millisUntil(t time.Time) int {
	return max(int((time.Until(t)+time.Millisecond-1)/time.Millisecond), 0)
}

// dupListener takes the listening socket out of the Go runtime's poller:
// n descriptors of it, one per loop, and ln is closed.
func dupListener(ln *net.TCPListener, n int) ([]int, error) {
	raw, err := ln.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("listener fd: %w", err)
	}
	var fds []int
	var dupErr error
	if err := raw.Control(func(s uintptr) {
		for range n {
			fd, err := unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				dupErr = err
				return
			}
			fds = append(fds, fd)
		}
	}); err != nil {
		closeAll(fds)
		return nil, fmt.Errorf("listener fd: %w", err)
	}
	if dupErr != nil {
		closeAll(fds)
		return nil, fmt.Errorf("dup listener: %w", dupErr)
	}
	ln.Close()
	return fds, nil
}

func (p *sockmapPlane) epollCtl(op, fd int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if err := unix.EpollCtl(p.epfd, op, fd, &ev); err != nil {
		return fmt.Errorf("epoll ctl fd %d: %w", fd, err)
	}
	return nil
}

func (p *sockmapPlane) dispatch(fd int, events uint32) {
	switch {
	case fd == p.lnfd && fd >= 0:
		p.acceptRun()
		return
	case fd == p.wakefd:
		var b [8]byte
		_, _ = unix.Read(p.wakefd, b[:])
		return
	}
	if fd >= len(p.byFD) || p.byFD[fd] == nil {
		return
	}
	ep := p.byFD[fd]
	c := ep.conn
	if c.connecting {
		p.finishConnect(c)
		return
	}
	if events&unix.EPOLLERR != 0 {
		if errno, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); errno != 0 {
			cause := unix.Errno(errno).Error()
			if p.env.log.Enabled(context.Background(), slog.LevelDebug) {
				// Two more system calls: only worth it for a debug line.
				cause += " on " + ep.describe()
			}
			p.reset(c, "reset", cause)
			return
		}
	}
	if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		ep.hangup = true
	}
	if events&unix.EPOLLOUT != 0 && !p.forward(ep.peer) {
		return
	}
	if !p.forward(ep) {
		return
	}
	p.settle(c)
}

func (p *sockmapPlane) acceptRun() {
	for range maxAcceptRun {
		fd, sa, err := unix.Accept4(p.lnfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch {
		case err == nil:
			p.accepted.Add(1)
			p.startConn(fd, sa)
		case errors.Is(err, unix.EAGAIN):
			return
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.ECONNABORTED):
			continue
		default:
			// EMFILE and the like: leave the rest queued in the backlog
			// and stop listening for a moment; the listener stays
			// readable, so waiting for it would spin.
			p.env.warn.Warn("accept", "accept failed, pausing accepts", "err", err, "pause", acceptPause, "active", len(p.conns))
			if p.epollCtl(unix.EPOLL_CTL_DEL, p.lnfd, 0) == nil {
				p.acceptPausedUntil = time.Now().Add(acceptPause)
			}
			return
		}
	}
}

func (p *sockmapPlane) track(ep *endpoint) {
	for ep.fd >= len(p.byFD) {
		p.byFD = append(p.byFD, make([]*endpoint, len(p.byFD)+1024)...)
	}
	p.byFD[ep.fd] = ep
}

func (p *sockmapPlane) startConn(cfd int, sa unix.Sockaddr) {
	client := sockaddrAddrPort(sa)
	release, reject := p.env.admission.admit(client.Addr())
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
	c := &smConn{lease: lease, release: release, clientAddr: client, start: now, lastActive: now}
	c.connectBy = now.Add(p.env.connectTimeout)
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
	c.connecting = true
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
	// (Accepted sockets inherit TCP_NODELAY from the listener.)
	_ = unix.SetsockoptInt(bfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	_ = setKeepalive(bfd, p.env.keepalive)
	sa, err := backendSockaddr(target)
	if err != nil {
		p.failConnect(c, err)
		return
	}
	if err := unix.Connect(bfd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		p.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, bfd, unix.EPOLLOUT|unix.EPOLLET); err != nil {
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
	}
	if localExhaustion(err) {
		p.env.balancer.countReject(RejectMaxConns)
		p.env.warn.Warn("exhausted", "refusing client: this host is out of descriptors or buffers", "client", c.clientAddr, "err", err)
		p.reset(c, "max_conns", err.Error())
		return
	}
	failed := c.lease
	failed.Failed(err)
	p.env.warn.Warn("dial:"+failed.Backend.ID, "dial backend failed", "client", c.clientAddr, "backend", failed.Backend.ID,
		"addr", failed.Backend.AddrPort(), "attempt", failed.Attempts(), "err", err)
	if failed.Attempts() > p.env.retries || !time.Now().Before(c.connectBy) {
		p.env.balancer.countReject(RejectAllDialsFailed)
		p.reset(c, "connect_failed", err.Error())
		return
	}
	next, reject := p.env.balancer.AcquireNext(failed)
	if next == nil {
		p.reset(c, "connect_failed", fmt.Sprintf("%s; no other backend: %s", err, reject))
		return
	}
	c.lease = next
	p.env.logOpen("sockmap", c.clientAddr, next)
	p.dial(c)
}

func (p *sockmapPlane) finishConnect(c *smConn) {
	if errno, err := unix.GetsockoptInt(c.backend.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || errno != 0 {
		if err == nil {
			err = unix.Errno(errno)
		}
		p.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	c.connecting = false
	c.lease.Connected()
	if err := p.pair(c); err != nil {
		p.env.log.Error("pair sockets failed", "client", c.clientAddr, "backend", c.lease.Backend.ID, "err", err)
		p.reset(c, "pair_failed", err.Error())
		return
	}
	p.forward(&c.client)
	p.forward(&c.backend)
	p.settle(c)
}

// pair puts both sockets into the sockhash, unarmed, then kicks each so
// bytes that arrived before insertion (a client that spoke first, a
// backend that greeted at once) run through the verdict now instead of
// waiting for the next arrival.
func (p *sockmapPlane) pair(c *smConn) error {
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		cookie, err := unix.GetsockoptUint64(ep.fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			return fmt.Errorf("read socket cookie: %w", err)
		}
		ep.cookie = cookie
		ep.state = p.maps.FlowState(ep.fd)
	}
	if err := p.maps.Pair(loader.Pair{
		ClientFD: c.client.fd, BackendFD: c.backend.fd,
		ClientCookie: c.client.cookie, BackendCookie: c.backend.cookie,
		Backend: c.lease.state.index,
	}); err != nil {
		if !errors.Is(err, loader.ErrNotEstablished) {
			return err
		}
		// A client that sent its request and FIN before the backend
		// answered the dial, or a backend that greeted and closed.
		c.copyMode = true
		if errors.Is(err, loader.ErrClientStaysPaired) {
			c.mapSockets, c.mapPairings = 1, 2
		}
		p.env.log.Debug("socket half-closed before pairing, copying in userspace",
			"client", c.clientAddr, "backend", c.lease.Backend.ID, "err", err)
	} else {
		c.mapSockets, c.mapPairings = 2, 2
	}
	p.counters.pairedSockets.Add(c.mapSockets)
	p.counters.pairings.Add(c.mapPairings)
	c.paired = true
	if err := p.epollCtl(unix.EPOLL_CTL_MOD, c.backend.fd, epollIn); err != nil {
		return err
	}
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, c.client.fd, epollIn); err != nil {
		return err
	}
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if err := unix.SetsockoptInt(ep.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1); err != nil {
			return fmt.Errorf("kick socket: %w", err)
		}
	}
	return nil
}

// forward does userspace's share of moving src's bytes to its peer: it
// writes what is pending, reads bytes the verdict passed while the
// direction was unarmed, arms the direction once nothing is left, and
// notices EOF. It returns false when the connection was torn down.
func (p *sockmapPlane) forward(src *endpoint) bool {
	c := src.conn
	if !c.paired || src.eof {
		return true
	}
	if c.copyMode {
		return p.copyForward(src)
	}
	dst := src.peer
	rounds := 0
	for {
		if done, alive := p.flushPending(src); !done {
			return alive
		}
		s := atomic.LoadUint64(src.state)
		if s&loader.FlowArmed != 0 {
			break
		}
		count := s & loader.FlowCountMask
		if count == src.settled {
			if atomic.CompareAndSwapUint64(src.state, s, s|loader.FlowArmed) {
				src.armed, src.behind = true, 0
				p.unclamp(src)
				p.restoreReceive(src)
				break
			}
			continue // the verdict counted more meanwhile
		}
		// Still behind after a few reads: the sender keeps pace with us,
		// so narrow its window or this race never ends.
		if src.behind++; src.behind == catchUpRounds {
			p.clampWindow(src)
		}
		if rounds++; rounds > maxForwardRounds {
			// Give the other connections their turn; the tick resumes.
			p.watch(c)
			return true
		}
		// Paused with redirected bytes still queued for dst: ours must
		// not overtake them.
		if src.paused {
			if sent, err := sentTo(dst); err != nil || sent < src.settled {
				p.watch(c)
				return true
			}
			src.paused = false
		}
		want := min(count-src.settled, uint64(len(p.buf)))
		n, err := unix.Read(src.fd, p.buf[:want])
		if errors.Is(err, unix.EAGAIN) || (err == nil && n == 0) {
			// Counted but not queued yet (the kernel defers a pass to its
			// worker when the socket's queue is busy); recv reports EOF
			// early when the FIN came meanwhile. EPOLLIN follows the
			// queueing, the tick is the safety net.
			p.watch(c)
			return true
		}
		if err != nil {
			p.reset(c, "reset", "read passed bytes")
			return false
		}
		src.settled += uint64(n)
		if !p.writeOrKeep(src, p.buf[:n]) {
			return false
		}
	}
	if !src.hangup {
		// Edge-triggered epoll reports RDHUP once, also for a FIN that
		// came before the socket was registered: no probe until then.
		return true
	}
	return p.checkEOF(src)
}

// copyForward moves src's bytes to its peer through userspace, for the
// rare connection that could not be spliced in the kernel.
func (p *sockmapPlane) copyForward(src *endpoint) bool {
	for {
		if done, alive := p.flushPending(src); !done {
			return alive
		}
		n, err := unix.Read(src.fd, p.buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return true
		case err != nil:
			p.reset(src.conn, "reset", "read copied bytes")
			return false
		case n == 0:
			src.eof, src.final = true, src.settled
			return true
		}
		src.settled += uint64(n)
		if !p.writeOrKeep(src, p.buf[:n]) {
			return false
		}
	}
}

// flushPending writes what src's peer has not taken yet of the bytes
// userspace read from src. done is false while the peer is full (EPOLLOUT
// resumes it); alive is false when the connection was reset.
func (p *sockmapPlane) flushPending(src *endpoint) (done, alive bool) {
	dst := src.peer
	for len(src.pending) > 0 {
		n, err := unix.Write(dst.fd, src.pending)
		if n > 0 {
			src.pending = src.pending[n:]
			countMoved(dst, n)
		}
		if errors.Is(err, unix.EAGAIN) {
			p.wantWritable(dst, true)
			return false, true
		}
		if err != nil {
			p.reset(src.conn, "reset", "write to peer: "+err.Error())
			return false, false
		}
	}
	p.wantWritable(dst, false)
	return true, true
}

// writeOrKeep writes b, read from src, to src's peer and keeps what the
// peer does not take as pending. It returns false when the connection was
// reset.
func (p *sockmapPlane) writeOrKeep(src *endpoint, b []byte) bool {
	dst := src.peer
	w, err := unix.Write(dst.fd, b)
	if errors.Is(err, unix.EAGAIN) {
		w, err = 0, nil
	}
	if err != nil {
		p.reset(src.conn, "reset", "write to peer: "+err.Error())
		return false
	}
	countMoved(dst, w)
	if w < len(b) {
		src.pending = append(src.pending[:0], b[w:]...)
	}
	return true
}

const (
	// catchUpRounds is how many reads userspace may spend behind the
	// verdict's count before it narrows the sender's window to catch up.
	catchUpRounds = 4
	// maxForwardRounds bounds one forward call (64 KiB each) so a busy
	// connection cannot starve the event loop.
	maxForwardRounds = 64
)

// clampWindow narrows the receive window of src's remote while userspace
// catches up; unclamp restores it once the direction is armed.
func (p *sockmapPlane) clampWindow(src *endpoint) {
	if src.clamp != 0 {
		return
	}
	orig, err := unix.GetsockoptInt(src.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP)
	if err != nil || orig <= 0 {
		return
	}
	if unix.SetsockoptInt(src.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, 4096) == nil {
		src.clamp = orig
	}
}

// pausedReceiveBuffer is the receive buffer of a paused direction's
// source: the bytes its sender keeps sending wait there until userspace
// forwards them, so it is what a paused direction parks on top of its
// budget share. The kernel doubles it for bookkeeping overhead and drops
// (for the sender to retransmit) what does not fit, so the queue stays
// bounded even for the window it promised before the pause.
const pausedReceiveBuffer = 128 << 10

func (p *sockmapPlane) shrinkReceive(src *endpoint) {
	if src.rcvbuf != 0 {
		return
	}
	orig, err := unix.GetsockoptInt(src.fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	if err != nil || orig <= 2*pausedReceiveBuffer {
		return
	}
	if unix.SetsockoptInt(src.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, pausedReceiveBuffer) == nil {
		src.rcvbuf = orig
	}
}

// restoreReceive gives an armed direction back the receive buffer it had
// before the pause (the kernel reports the doubled size it keeps).
func (p *sockmapPlane) restoreReceive(src *endpoint) {
	if src.rcvbuf != 0 {
		_ = unix.SetsockoptInt(src.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, src.rcvbuf/2)
		src.rcvbuf = 0
	}
}

func (p *sockmapPlane) unclamp(src *endpoint) {
	if src.clamp != 0 {
		_ = unix.SetsockoptInt(src.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, src.clamp)
		src.clamp = 0
	}
}

// checkEOF looks for the remote's FIN on an armed socket. recv takes the
// socket lock, so once it returns 0 the verdict has seen every byte that
// came before the FIN and the count is final.
func (p *sockmapPlane) checkEOF(src *endpoint) bool {
	var b [1]byte
	n, _, err := unix.Recvfrom(src.fd, b[:], unix.MSG_DONTWAIT|unix.MSG_PEEK)
	switch {
	case errors.Is(err, unix.EAGAIN):
		return true
	case err != nil:
		p.reset(src.conn, "reset", "probe for EOF")
		return false
	case n == 0:
		src.eof = true
		src.final = atomic.LoadUint64(src.state) & loader.FlowCountMask
		return true
	}
	// Bytes in the socket's own queue while armed: a redirect failed
	// because the peer is gone.
	if s := atomic.LoadUint64(src.state); s&loader.FlowArmed != 0 {
		p.reset(src.conn, "reset", "bytes left after redirect failed")
		return false
	}
	return true
}

// settle propagates FINs whose bytes have all reached the peer's send
// queue, and closes the connection once both directions are done.
func (p *sockmapPlane) settle(c *smConn) {
	waiting := false
	for _, src := range []*endpoint{&c.client, &c.backend} {
		dst := src.peer
		if !src.eof || dst.shut {
			continue
		}
		sent, err := sentTo(dst)
		if err != nil {
			p.reset(c, "reset", "read peer send queue")
			return
		}
		if sent < src.final || len(src.pending) > 0 {
			waiting = true
			continue
		}
		if err := unix.Shutdown(dst.fd, unix.SHUT_WR); err != nil {
			p.reset(c, "reset", "half-close peer")
			return
		}
		dst.shut = true
	}
	if c.client.shut && c.backend.shut {
		p.finish(c, "closed")
		return
	}
	if waiting {
		p.watch(c)
	}
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

// countMoved adds bytes userspace wrote to dst to its backend's counters.
func countMoved(dst *endpoint, n int) {
	st := dst.conn.lease.state
	if dst == &dst.conn.backend {
		st.bytesIn.Add(uint64(n))
	} else {
		st.bytesOut.Add(uint64(n))
	}
}

func (p *sockmapPlane) wantWritable(ep *endpoint, want bool) {
	if ep.wantOut == want {
		return
	}
	ev := uint32(epollIn)
	if want {
		ev |= unix.EPOLLOUT
	}
	if err := p.epollCtl(unix.EPOLL_CTL_MOD, ep.fd, ev); err == nil {
		ep.wantOut = want
	}
}

func (p *sockmapPlane) watch(c *smConn) { c.watched = true }

// onTick handles what epoll cannot tell: connect deadlines, redirected
// bytes draining into a peer (FIN and resume wait on it), and backlog
// growth behind a slow receiver.
func (p *sockmapPlane) onTick(now time.Time) {
	if (p.env.idleTimeout > 0 || p.env.stallTimeout > 0) && !now.Before(p.nextSweep) {
		p.nextSweep = now.Add(time.Second)
		p.sweep(now)
	}
	for c := range p.conns {
		if c.connecting {
			if now.After(c.deadline) {
				p.failConnect(c, fmt.Errorf("connect: timed out after %s", c.deadline.Sub(c.start).Round(time.Millisecond)))
			}
			continue
		}
		if c.watched {
			c.watched = false
			if !p.forward(&c.client) || !p.forward(&c.backend) {
				continue
			}
			p.settle(c)
			if _, alive := p.conns[c]; !alive {
				continue
			}
		}
		p.checkBacklog(&c.client)
		p.checkBacklog(&c.backend)
	}
}

// checkBacklog bounds the bytes redirected into a peer's psock queue but
// not yet in its send buffer: the kernel bounds neither that queue nor the
// sender. Past pauseBacklog (a slow receiver, or a kernel worker far
// behind) it disarms the direction: the verdict then passes bytes to the
// socket's own queue, which its receive buffer bounds and TCP flow control
// throttles, and userspace forwards them as the receiver drains, then
// re-arms. (Narrowing the sender's window instead was tried: it cost a
// third of the bulk throughput and still let the queue grow.)
func (p *sockmapPlane) checkBacklog(src *endpoint) {
	if !src.armed || src.eof || src.conn.copyMode {
		return
	}
	s := atomic.LoadUint64(src.state)
	count := s & loader.FlowCountMask
	if count == src.lastSeen {
		return
	}
	// What arrived since the last check will likely arrive again before
	// the next: pausing on the backlog plus that growth keeps a fast
	// sender from overshooting its share by a tick's worth of bytes.
	growth := count - src.lastSeen
	src.lastSeen = count
	// Everything the receiver has not acknowledged is parked here: the
	// psock queue, and the peer socket's send queue behind it.
	info, err := unix.GetsockoptTCPInfo(src.peer.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return
	}
	delivered := info.Bytes_acked - min(info.Bytes_acked, src.peer.base)
	if delivered > count {
		return
	}
	backlog := count - delivered
	if backlog+growth < p.pauseBacklog() {
		return
	}
	for s&loader.FlowArmed != 0 {
		if atomic.CompareAndSwapUint64(src.state, s, s&^loader.FlowArmed) {
			src.armed, src.paused = false, true
			src.settled = s & loader.FlowCountMask
			p.shrinkReceive(src)
			p.watch(src.conn)
			p.env.log.Debug("direction paused for a slow receiver", "client", src.conn.clientAddr,
				"socket", src.side(), "backlog", backlog)
			return
		}
		s = atomic.LoadUint64(src.state)
	}
}

// minPauseBacklog keeps a direction's share of the budget large enough to
// splice in the kernel at all: below a few dozen skbs every burst would
// pause and fall back to userspace.
const minPauseBacklog = 256 << 10

// pauseBacklog is where a direction pauses: half its share of the buffer
// budget (EDGEPROXY_MAX_BUFFERED_MB, split over every direction open) in
// bytes its receiver has not acknowledged. The other half is for what is
// already on its way when the pause lands: the sender's open window into
// the source socket's receive queue, a tick's growth. With every direction
// paused, all connections together park about the budget.
func (p *sockmapPlane) pauseBacklog() uint64 {
	if p.env.bufferBudget == 0 {
		return p.maxPauseBacklog
	}
	share := p.env.bufferBudget / uint64(max(2*p.counters.active.Load(), 1))
	return min(max(share/2, minPauseBacklog), p.maxPauseBacklog)
}

// sweep closes connections idle both ways for the idle timeout and resets
// directions stalled for the stall timeout. Idleness comes from the flow
// counters the verdict keeps in shared memory: no system call per
// connection. Only a direction whose count did not move since the last
// stall sweep costs one TCP_INFO, on the socket it drains into.
func (p *sockmapPlane) sweep(now time.Time) {
	stallDue := p.env.stallTimeout > 0 && !now.Before(p.nextStallSweep)
	if stallDue {
		p.nextStallSweep = now.Add(stallSweepPeriod(p.env.stallTimeout))
	}
	for c := range p.conns {
		if c.connecting || !c.paired {
			continue
		}
		moved := false
		for _, ep := range []*endpoint{&c.client, &c.backend} {
			n := ep.settledTotal()
			if n != ep.sweptCount {
				ep.sweptCount, moved = n, true
				ep.peer.stallSince = time.Time{} // its bytes move: no stall there
			}
		}
		if moved {
			c.lastActive = now
			continue
		}
		if p.env.idleTimeout > 0 && now.Sub(c.lastActive) >= p.env.idleTimeout {
			p.env.log.Debug("closing idle connection", "client", c.clientAddr, "backend", c.lease.Backend.ID, "idle", now.Sub(c.lastActive))
			p.finishIdle(c)
			continue
		}
		if stallDue && p.stalled(c, now) {
			p.env.warn.Warn("stall", "resetting a stalled connection: its receiver took no byte", "client", c.clientAddr,
				"backend", c.lease.Backend.ID, "stall_timeout", p.env.stallTimeout)
			p.reset(c, "stalled", "no progress")
		}
	}
}

// stallSweepPeriod checks a few times per stall timeout, at most once a
// second.
func stallSweepPeriod(stall time.Duration) time.Duration {
	return min(max(stall/4, time.Second), 15*time.Second)
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
	if _, ok := p.conns[c]; ok {
		p.env.log.Debug("connection aborted", "client", c.clientAddr, "backend", c.lease.Backend.ID, "cause", cause)
	}
	p.teardown(c, true, how)
}

func (p *sockmapPlane) teardown(c *smConn, hard bool, how string) {
	if _, ok := p.conns[c]; !ok {
		return
	}
	delete(p.conns, c)
	p.counters.active.Add(-1)
	p.counters.pairedSockets.Add(-c.mapSockets)
	p.counters.pairings.Add(-c.mapPairings)
	if c.paired {
		if err := p.maps.Unpair(loader.Pair{ClientCookie: c.client.cookie, BackendCookie: c.backend.cookie}); err != nil {
			p.env.log.Error("unpair failed", "client", c.clientAddr, "err", err)
		}
	}
	for _, ep := range []*endpoint{&c.client, &c.backend} {
		if ep.fd < 0 {
			continue
		}
		p.byFD[ep.fd] = nil
		if hard {
			closeWithReset(ep.fd)
		} else {
			unix.Close(ep.fd)
		}
	}
	c.lease.Release()
	c.release()
	in, out := c.client.settledTotal(), c.backend.settledTotal()
	p.env.onClose(ConnSummary{
		Client: c.clientAddr, Backend: c.lease.Backend.ID,
		BytesIn: in, BytesOut: out, Duration: time.Since(c.start), End: how, Dataplane: "sockmap",
	})
}

func (ep *endpoint) side() string {
	if ep == &ep.conn.client {
		return "client"
	}
	return "backend"
}

// describe is the endpoint's forwarding state, for debug logs.
func (ep *endpoint) describe() string {
	var state uint64
	if ep.state != nil {
		state = atomic.LoadUint64(ep.state)
	}
	sent, _ := sentTo(ep)
	return fmt.Sprintf("%s socket (armed=%v paused=%v eof=%v shut=%v settled=%d count=%d sent_to=%d pending=%d; peer eof=%v final=%d)",
		ep.side(), ep.armed, ep.paused, ep.eof, ep.shut, ep.settled, state&loader.FlowCountMask, sent, len(ep.pending), ep.peer.eof, ep.peer.final)
}

func (ep *endpoint) settledTotal() uint64 {
	if ep.state == nil || ep.conn.copyMode {
		return ep.settled
	}
	return atomic.LoadUint64(ep.state) & loader.FlowCountMask
}

// acceptPause is how long accepts stop after accept itself failed.
const acceptPause = 100 * time.Millisecond

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

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}
