//go:build linux

package userspace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/edgeproxy/edgeproxy/loader"
	"golang.org/x/sys/unix"
)

// sockmapPlane splices each connection that lives long or moves much
// inside the kernel: the verdict program redirects every skb a socket
// receives to its peer's send path. A young connection is copied through
// userspace until then (pairLate), so the short ones never pay for the
// sockhash. One goroutine runs an epoll loop for all connections, from
// accept to close; no goroutine is parked per connection and, once a
// connection is paired, no payload is copied through userspace except
// bytes that arrive before a direction is armed or while it is paused
// for backpressure.
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
	byFD               []*endpoint // by descriptor number: what epoll reports
	conns              map[*smConn]struct{}
	// recheck holds the connections the next tick re-examines: what epoll
	// will not report (bytes draining into a peer, a forward cut short).
	recheck map[*smConn]struct{}
	// unpairs are the pairings of closed connections, deleted in one
	// bpf() call at unpairBy (or once maxUnpairBatch wait).
	unpairs  []loader.Pair
	unpairBy time.Time
	buf      []byte
	// now is when the loop last woke from epoll: the time of what it
	// reads in that round, without a clock read per read.
	now time.Time
	// pipes lends the pipes a streaming unpaired direction splices
	// through; their number is bounded across loops.
	pipes pipePool
	// headers are the accepted connections still waiting for their
	// trusted upstream's PROXY header: not routed yet, not in conns.
	headers  *headerWaits
	counters *sockmapCounters // shared by every loop
	accepted atomic.Uint64    // connections this loop accepted
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

const (
	// epollIn is how a paired socket is registered: edge-triggered, so an
	// armed socket whose bytes the kernel moves wakes the loop only when
	// something changes, RDHUP included to notice a FIN.
	epollIn = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET
	// epollArmed is how the socket of an armed direction that carries
	// many messages is registered: without EPOLLIN. The kernel moves its
	// bytes, yet after each skb the verdict consumed,
	// sk_psock_verdict_data_ready calls the socket's own data-ready
	// callback, whose wake-up carries EPOLLIN: registered for it, the
	// loop's thread woke once per message with nothing to do. A FIN still wakes it
	// (tcp_fin's state-change wake-up carries no event mask, and the
	// socket then polls RDHUP), and so do errors and hang-ups.
	epollArmed = unix.EPOLLRDHUP | unix.EPOLLET
	// quietAfterTicks is how many ticks an armed direction must move
	// bytes in before its socket is registered without EPOLLIN. The
	// wake-ups it saves never reach userspace (epoll re-polls the socket,
	// finds nothing readable and sleeps again), so they cannot be counted
	// where they happen; a direction busy for 20 ms is one that goes on
	// exchanging messages, and pays the epoll_ctl once, while the short
	// connections the connection-rate figure counts do not. Never at
	// arming: bytes that queued before the socket entered the sockhash
	// are unseen by the verdict until kickUnseen, which EPOLLIN triggers,
	// feeds them through (a greeting hung when the socket went quiet at
	// once); once the verdict has counted bytes, read_skb has drained the
	// queue from its head, so nothing unseen is left.
	quietAfterTicks = 4
	// pairAfterAge is how long a connection is served from userspace
	// before it may be paired: four ticks (20 ms). A short connection
	// (connect, a message each way, close) is over long before, so it
	// never pays for the two sockhash inserts, the pairings write, psock
	// set-up and RCU teardown, the SO_COOKIE reads and the kick, nor a
	// psock worker's wake-up per message (sk_psock_skb_redirect schedules
	// sk_psock_backlog for every skb); one still exchanging messages after
	// that long goes on doing so. A connection is paired only while it
	// talks, and never while it streams (see judgeWindow).
	pairAfterAge = 4 * tickPeriod
	// talkingWithin is how recently an unpaired connection must have
	// read something to be paired: two ticks, so a loop that woke late
	// still counts a message of the last tick, while a connection that
	// greeted at its start and went quiet (pairAfterAge ago) does not.
	talkingWithin = 2 * tickPeriod
	// streamReadBytes is the mean read, over a pairing window, at which a
	// direction counts as a stream and stays spliced through a pipe
	// instead of being paired: a quarter of readChunk. A request/response
	// exchange reads one message per wake-up (2 KiB in the benchmark's
	// workload, 64 B in its round trip); a bulk stream finds tens of KiB
	// queued at every wake-up.
	streamReadBytes = readChunk / 4
	// maxAcceptRun bounds the accepts of one wake-up, so a flood of new
	// clients cannot starve the connections this loop already holds.
	maxAcceptRun = 256
	// readChunk is the userspace buffer for bytes the verdict passed:
	// 64 KiB, the most one TCP skb carries with GSO, so one read takes a
	// whole skb.
	readChunk = 64 << 10
	// tickPeriod is how often a loop wakes without events: connect
	// deadlines, backlog checks, FINs waiting on a drain. 5 ms, a little
	// more than one jiffy at HZ=250 (the psock worker's retry delay), so a
	// tick rarely looks twice at an unchanged queue; at line rate one tick
	// of growth is what pauseBacklog leaves room for.
	tickPeriod = 5 * time.Millisecond
	// sweepPeriod is how often idle and stall checks walk the connections:
	// both timeouts are set in whole seconds.
	sweepPeriod = time.Second
	// maxEventsPerWait is how many events one epoll_wait returns at most.
	maxEventsPerWait = 256
	// fdTableGrowth is how many descriptor slots the endpoint table grows
	// by at least: amortizes the copy, costs 8 KiB of pointers.
	fdTableGrowth = 1024
	// acceptPause is how long accepts stop after accept itself failed.
	acceptPause = 100 * time.Millisecond
	// unpairDelay is the longest the pairings of a closed connection wait
	// to be deleted with others: a stale pairing is inert, and at a few
	// thousand closes a second 50 ms gathers a hundred or more into one
	// bpf() call.
	unpairDelay = 50 * time.Millisecond
	// maxUnpairBatch bounds the pairings waiting meanwhile, so stale
	// entries stay a small fraction of the pairings map in a burst.
	maxUnpairBatch = 512
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
	pipes    pipeBudget // pipes open, all loops
}

func newSockmapPlane(env planeEnv, maps *loader.Sockmap) *sockmapLoops {
	counters := &sockmapCounters{}
	l := &sockmapLoops{maps: maps, counters: counters}
	l.pipes.limit = int64(splicePipesFor(env.admission.maxConns))
	for range max(env.workers, 1) {
		l.loops = append(l.loops, newSockmapLoop(env, maps, counters, &l.pipes))
	}
	return l
}

func newSockmapLoop(env planeEnv, maps *loader.Sockmap, counters *sockmapCounters, pipes *pipeBudget) *sockmapPlane {
	return &sockmapPlane{
		env:             env,
		maps:            maps,
		counters:        counters,
		pipes:           pipePool{budget: pipes},
		maxPauseBacklog: maxPauseBacklog,
		tick:            tickPeriod,
		conns:           map[*smConn]struct{}{},
		recheck:         map[*smConn]struct{}{},
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
	serves := make([]loopServe, len(l.loops))
	for i, loop := range l.loops {
		if len(l.loops) > 1 {
			loop.lnEvents |= unix.EPOLLEXCLUSIVE
		}
		serves[i] = loop.serve
	}
	return serveLoops(accept, stop, ln, serves)
}

// loopServe runs one event loop on its own descriptor of the listener.
type loopServe func(accept, stop context.Context, lnfd int) error

// serveLoops runs each loop of a plane on its own copy of the listening
// socket until each has drained. Accepted sockets inherit TCP_NODELAY from
// the listener: a ping-pong's small writes leave at once, and no client
// costs a system call for it. A loop that fails stops the others (their
// connections are reset) and its error is returned.
func serveLoops(accept, stop context.Context, ln *net.TCPListener, serves []loopServe) error {
	fds, err := dupListener(ln, len(serves))
	if err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fds[0], unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		closeAll(fds)
		return fmt.Errorf("set TCP_NODELAY on the listener: %w", err)
	}
	stop, failed := context.WithCancel(stop)
	defer failed()
	errs := make(chan error, len(serves))
	for i, serve := range serves {
		go func() {
			err := serve(accept, stop, fds[i])
			if err != nil {
				failed()
			}
			errs <- err
		}()
	}
	var all []error
	for range serves {
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
	defer p.pipes.closeAll()
	p.headers = newHeaderWaits(p.env, p.epfd, true)
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, p.lnfd, p.lnEvents); err != nil {
		return err
	}
	if err := p.epollCtl(unix.EPOLL_CTL_ADD, p.wakefd, unix.EPOLLIN); err != nil {
		return err
	}
	wake := func() { _, _ = unix.Write(p.wakefd, []byte{1, 0, 0, 0, 0, 0, 0, 0}) }
	defer context.AfterFunc(accept, wake)()
	defer context.AfterFunc(stop, wake)()

	events := make([]unix.EpollEvent, maxEventsPerWait)
	nextTick := time.Now().Add(p.tick)
	for {
		if accept.Err() != nil && p.lnfd >= 0 {
			// Draining: no new clients; established ones finish. Out of
			// epoll first: closing this descriptor does not remove the
			// registration while another one refers to the same socket
			// (epoll(7): only the last close of the open file does), and
			// after a hand-over the successor holds one. Left in, this
			// loop's EPOLLEXCLUSIVE wait would take wake-ups meant for
			// the successor's loops, and its events would name an fd
			// number another socket may have taken since.
			_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, p.lnfd, nil)
			unix.Close(p.lnfd)
			p.lnfd = -1
		}
		if stop.Err() != nil {
			for c := range p.conns {
				p.reset(c, "shutdown", "drain ended")
			}
			p.headers.closeAll()
			p.flushUnpairs()
			return nil
		}
		if p.lnfd < 0 && len(p.conns) == 0 && p.headers.pending() == 0 {
			p.flushUnpairs()
			return nil
		}
		timeout := -1
		if len(p.conns) > 0 {
			timeout = millisUntil(nextTick)
		} else if len(p.unpairs) > 0 {
			timeout = millisUntil(p.unpairBy)
		}
		if !p.acceptPausedUntil.IsZero() {
			// The listener is out of epoll: wake up to put it back.
			if t := millisUntil(p.acceptPausedUntil); timeout < 0 || t < timeout {
				timeout = t
			}
		}
		if d := p.headers.nextDeadline(); !d.IsZero() {
			if t := millisUntil(d); timeout < 0 || t < timeout {
				timeout = t
			}
		}
		n, err := unix.EpollWait(p.epfd, events, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("epoll wait: %w", err)
		}
		p.now = time.Now()
		for i := range max(n, 0) {
			p.dispatch(int(events[i].Fd), events[i].Events)
		}
		if p.headers.pending() > 0 {
			p.headers.expire(time.Now())
		}
		if len(p.conns) == 0 && len(p.unpairs) > 0 && !time.Now().Before(p.unpairBy) {
			p.flushUnpairs()
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
	if p.headers.waiting(fd) {
		if origin, ok := p.headers.ready(fd, events); ok {
			p.startConn(fd, origin)
		}
		return
	}
	if fd >= len(p.byFD) || p.byFD[fd] == nil {
		return
	}
	ep := p.byFD[fd]
	c := ep.conn
	if c.phase == connDialling {
		p.finishConnect(c, events)
		return
	}
	if events&unix.EPOLLERR != 0 {
		// EPOLLERR on a TCP socket is its error set (tcp_poll: sk_err, or
		// an error queue this proxy never enables): the remote reset it,
		// or keepalive gave up. Which one is read only for a debug line.
		cause := "socket error"
		if p.env.log.Enabled(context.Background(), slog.LevelDebug) {
			if errno, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); errno != 0 {
				cause = unix.Errno(errno).Error()
			}
			cause += " on " + ep.describe()
		}
		p.resetAfter(c, ep, "reset", cause)
		return
	}
	if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		ep.hangup = true
	}
	if c.phase == connSpliced && events&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0 {
		p.kickUnseen(ep)
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
		fd, client, err := acceptTCP(p.lnfd)
		switch {
		case err == nil:
			p.accepted.Add(1)
			if p.env.proxyHeaders.from.trusts(client.Addr()) {
				p.headers.begin(fd, client, time.Now())
				continue
			}
			p.startConn(fd, clientOrigin{client: client})
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
		p.byFD = append(p.byFD, make([]*endpoint, len(p.byFD)+fdTableGrowth)...)
	}
	p.byFD[ep.fd] = ep
}

// register sets what ep's socket is registered for in epoll: an ADD the
// first time, a MOD when the interest changed, no system call otherwise.
func (p *sockmapPlane) register(ep *endpoint, events uint32) error {
	if ep.events == events {
		return nil
	}
	op := unix.EPOLL_CTL_MOD
	if ep.events == 0 {
		op = unix.EPOLL_CTL_ADD
	}
	if err := p.epollCtl(op, ep.fd, events); err != nil {
		return err
	}
	ep.events = events
	return nil
}

// wantWritable adds EPOLLOUT to ep's registration while bytes for it wait
// in userspace, and takes it away once they are written.
func (p *sockmapPlane) wantWritable(ep *endpoint, want bool) {
	ev := ep.readEvents()
	if want {
		ev |= unix.EPOLLOUT
	}
	_ = p.register(ep, ev)
}

// readEvents is what ep is registered for besides EPOLLOUT: EPOLLIN
// unless its direction is armed and quiet (see epollArmed).
func (ep *endpoint) readEvents() uint32 {
	if ep.quiet {
		return epollArmed
	}
	return epollIn
}

// quietWhenBusy counts the ticks in which an armed direction moved bytes;
// after quietAfterTicks of them its socket stops asking for EPOLLIN.
func (p *sockmapPlane) quietWhenBusy(ep *endpoint) {
	if ep.quiet || ep.state != dirArmed {
		return
	}
	if ep.busyTicks++; ep.busyTicks >= quietAfterTicks {
		ep.quiet = true
		p.reregister(ep)
	}
}

// reregister updates ep's registration after its direction changed
// state, keeping EPOLLOUT as it was. Adding EPOLLIN back re-polls the
// socket, so bytes that arrived meanwhile are reported.
func (p *sockmapPlane) reregister(ep *endpoint) {
	if ep.events != 0 {
		_ = p.register(ep, ep.readEvents()|ep.events&unix.EPOLLOUT)
	}
}

// watch has c re-examined on the next tick: redirected bytes draining
// into a peer, or a forward that gave other connections their turn.
func (p *sockmapPlane) watch(c *smConn) { p.recheck[c] = struct{}{} }

// onTick handles what epoll cannot tell: connect deadlines, redirected
// bytes draining into a peer (FIN and resume wait on it), and backlog
// growth behind a slow receiver.
func (p *sockmapPlane) onTick(now time.Time) {
	if len(p.unpairs) > 0 && !now.Before(p.unpairBy) {
		p.flushUnpairs()
	}
	if (p.env.idleTimeout > 0 || p.env.stallTimeout > 0) && !now.Before(p.nextSweep) {
		p.nextSweep = now.Add(sweepPeriod)
		p.sweep(now)
	}
	for c := range p.conns {
		if c.phase == connDialling {
			if now.After(c.deadline) {
				p.failConnect(c, fmt.Errorf("connect: timed out after %s", c.deadline.Sub(c.start).Round(time.Millisecond)))
			}
			continue
		}
		if !c.keepaliveAt.IsZero() && !now.Before(c.keepaliveAt) {
			c.keepaliveAt = time.Time{}
			if err := setKeepalive(c.backend.fd, p.env.keepalive); err != nil {
				p.env.log.Debug("backend keepalive not set", "client", c.clientAddr, "backend", c.lease.Backend.ID, "err", err)
			}
		}
		if _, due := p.recheck[c]; due {
			delete(p.recheck, c)
			if !p.forward(&c.client) || !p.forward(&c.backend) {
				continue
			}
			p.settle(c)
			if c.phase == connClosed {
				continue
			}
		}
		if c.phase == connUnpaired {
			streaming := c.judgeWindow()
			talking := now.Sub(c.lastRead) <= talkingWithin
			if !now.Before(c.pairBy) && talking && !streaming && p.pairLate(c) {
				p.settle(c)
			}
			continue
		}
		p.checkBacklog(&c.client, now)
		p.checkBacklog(&c.backend, now)
	}
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
		if c.phase != connUnpaired && c.phase != connSpliced && c.phase != connCopying {
			continue
		}
		moved := false
		for _, ep := range []*endpoint{&c.client, &c.backend} {
			n := ep.settledTotal() + ep.movedOut
			if n != ep.sweptCount {
				ep.sweptCount, moved = n, true
				ep.peer.stallSince = time.Time{} // its bytes move: no stall there
			}
		}
		if moved {
			c.lastActive = now
			continue
		}
		// Bytes still in userspace's hands would be lost to an orderly
		// close: a connection holding some is stalled, not idle.
		if p.env.idleTimeout > 0 && now.Sub(c.lastActive) >= p.env.idleTimeout && !c.holdsBytes() {
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

// queueUnpair has a closed connection's pairing entries deleted with the
// next batch.
func (p *sockmapPlane) queueUnpair(pair loader.Pair) {
	if len(p.unpairs) == 0 {
		p.unpairBy = time.Now().Add(unpairDelay)
	}
	p.unpairs = append(p.unpairs, pair)
	if len(p.unpairs) >= maxUnpairBatch {
		p.flushUnpairs()
	}
}

// flushUnpairs deletes the pairing entries of the connections closed since
// the last flush, in one bpf() call.
func (p *sockmapPlane) flushUnpairs() {
	if len(p.unpairs) == 0 {
		return
	}
	if err := p.maps.Unpair(p.unpairs...); err != nil {
		p.env.log.Error("unpair failed", "connections", len(p.unpairs), "err", err)
	}
	p.counters.pairings.Add(-2 * int64(len(p.unpairs)))
	p.unpairs = p.unpairs[:0]
}

// acceptTCP accepts one client, non-blocking and close-on-exec, and
// decodes its address itself: unix.Accept4 asks the kernel for the
// socket's protocol (SO_PROTOCOL, to tell L2TP apart) on every accept, a
// system call a TCP listener does not need.
func acceptTCP(lnfd int) (int, netip.AddrPort, error) {
	var raw unix.RawSockaddrAny
	size := uint32(unix.SizeofSockaddrAny)
	fd, _, errno := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(lnfd), uintptr(unsafe.Pointer(&raw)),
		uintptr(unsafe.Pointer(&size)), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if errno != 0 {
		return -1, netip.AddrPort{}, errno
	}
	return int(fd), rawAddrPort(&raw), nil
}

// rawAddrPort is the address of an AF_INET or AF_INET6 socket address,
// IPv4-mapped IPv6 unmapped; the port is stored in network byte order.
func rawAddrPort(raw *unix.RawSockaddrAny) netip.AddrPort {
	switch raw.Addr.Family {
	case unix.AF_INET:
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), networkPort(in.Port))
	case unix.AF_INET6:
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom16(in.Addr).Unmap(), networkPort(in.Port))
	}
	return netip.AddrPort{}
}

func networkPort(port uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&port))
	return uint16(b[0])<<8 | uint16(b[1])
}

// kickUnseen makes the kernel run the verdict over bytes that reached ep's
// socket before it entered the sockhash: they wait in its receive queue,
// and the verdict runs over that queue, in order, only when more bytes
// arrive, which a request/response peer may never do. Setting SO_RCVLOWAT
// runs the socket's data-ready path now. It is needed only while the
// verdict has never run for the socket (its flow word holds no count and
// no FIN): epoll reported the socket readable, yet no skb went through the
// verdict, so the bytes it saw were queued before insertion. (Registering
// a socket, or changing its registration, reports what is already
// readable, so the event is not missed.) Kicking every socket at pairing
// instead cost two system calls per connection.
func (p *sockmapPlane) kickUnseen(ep *endpoint) {
	if atomic.LoadUint64(ep.flow)&^loader.FlowArmed != 0 {
		return
	}
	if err := kick(ep.fd); err != nil {
		p.reset(ep.conn, "reset", err.Error())
	}
}

func kick(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1); err != nil {
		return fmt.Errorf("kick socket: %w", err)
	}
	return nil
}
