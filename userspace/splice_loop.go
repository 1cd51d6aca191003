package userspace

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// spliceLoop is one event loop of the splice plane. Everything in it is
// touched by its own goroutine only, except accepted.
type spliceLoop struct {
	env    planeEnv
	shared *spliceShared

	epfd, wakefd, lnfd int
	// lnEvents is how the listener is registered: EPOLLEXCLUSIVE when
	// several loops wait on it, so one connection wakes one loop.
	lnEvents uint32
	bySocket []*spliceSocket // by descriptor
	conns    map[*spliceConn]struct{}
	// connecting are the connections whose backend dial is in flight:
	// the loop wakes for the earliest attempt deadline among them.
	connecting map[*spliceConn]struct{}
	// resume are connections a pump left with bytes still to move
	// (maxPumpRounds), so one busy stream cannot starve the others.
	// Edge-triggered epoll will not report them again: the loop does.
	resume   []*spliceConn
	pipes    pipePool
	buf      []byte        // copies of directions that found no pipe free
	accepted atomic.Uint64 // connections this loop accepted

	// acceptPausedUntil is set when accept itself failed (out of
	// descriptors): the listener leaves epoll until then, instead of
	// waking the loop for the same error thousands of times a second.
	acceptPausedUntil time.Time
	// now is read once per wake-up: the time bytes that moved in it are
	// stamped with, for the idle sweep.
	now            time.Time
	nextSweep      time.Time
	nextStallSweep time.Time
}

func newSpliceLoop(env planeEnv, shared *spliceShared) *spliceLoop {
	return &spliceLoop{
		env:        env,
		shared:     shared,
		lnEvents:   unix.EPOLLIN,
		conns:      map[*spliceConn]struct{}{},
		connecting: map[*spliceConn]struct{}{},
		pipes:      pipePool{budget: &shared.pipes},
		buf:        make([]byte, copyChunk),
	}
}

const (
	// spliceEvents: each socket is registered once, edge-triggered, for
	// both ways. EPOLLOUT costs no wake-up while a socket has room: TCP
	// reports write space only to a writer that found none
	// (SOCK_NOSPACE, tcp_check_space).
	spliceEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET
	// copyChunk is one read of a direction that copies through userspace.
	copyChunk = 64 << 10
	// maxPumpRounds bounds one pump (a pipe-full each) before the loop
	// serves the other connections.
	maxPumpRounds = 16
)

// serve runs the loop, accepting on lnfd (its own descriptor of the
// listening socket, closed when it drains). Accepted sockets are
// non-blocking and inherit keepalive and TCP_NODELAY from the listener.
func (l *spliceLoop) serve(accept, stop context.Context, lnfd int) error {
	var err error
	l.lnfd = lnfd
	defer func() {
		if l.lnfd >= 0 {
			unix.Close(l.lnfd)
		}
	}()
	defer l.pipes.closeAll()
	if l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("create epoll: %w", err)
	}
	defer unix.Close(l.epfd)
	if l.wakefd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		return fmt.Errorf("create eventfd: %w", err)
	}
	defer unix.Close(l.wakefd)
	if err := l.epollCtl(unix.EPOLL_CTL_ADD, l.lnfd, l.lnEvents); err != nil {
		return err
	}
	if err := l.epollCtl(unix.EPOLL_CTL_ADD, l.wakefd, unix.EPOLLIN); err != nil {
		return err
	}
	wake := func() { _, _ = unix.Write(l.wakefd, []byte{1, 0, 0, 0, 0, 0, 0, 0}) }
	defer context.AfterFunc(accept, wake)()
	defer context.AfterFunc(stop, wake)()

	events := make([]unix.EpollEvent, 256)
	for {
		if accept.Err() != nil && l.lnfd >= 0 {
			// Draining: no new clients; established ones finish. Out of
			// epoll first: the registration would outlive this descriptor
			// while other loops still hold the listening socket, and its
			// events would come under a number a new socket may reuse.
			_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, l.lnfd, nil)
			unix.Close(l.lnfd)
			l.lnfd = -1
		}
		if stop.Err() != nil {
			for c := range l.conns {
				l.reset(c, "shutdown", "drain ended")
			}
			return nil
		}
		if l.lnfd < 0 && len(l.conns) == 0 {
			return nil
		}
		n, err := unix.EpollWait(l.epfd, events, l.waitTimeout())
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("epoll wait: %w", err)
		}
		l.now = time.Now()
		for i := range max(n, 0) {
			l.dispatch(int(events[i].Fd), events[i].Events)
		}
		l.resumePumps()
		now := l.now
		l.checkConnects(now)
		if l.env.idleTimeout > 0 || l.env.stallTimeout > 0 {
			if !now.Before(l.nextSweep) {
				l.nextSweep = now.Add(spliceSweepPeriod)
				l.sweep(now)
			}
		}
		if l.lnfd >= 0 && !l.acceptPausedUntil.IsZero() && !now.Before(l.acceptPausedUntil) {
			l.acceptPausedUntil = time.Time{}
			if err := l.epollCtl(unix.EPOLL_CTL_ADD, l.lnfd, l.lnEvents); err != nil {
				return err
			}
		}
	}
}

// waitTimeout is how long epoll may sleep: until the earliest of a
// connect deadline, the next sweep and the listener's return, or not at
// all while pumps wait for their turn.
func (l *spliceLoop) waitTimeout() int {
	if len(l.resume) > 0 {
		return 0
	}
	var next time.Time
	earlier := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for c := range l.connecting {
		earlier(c.deadline)
	}
	if len(l.conns) > 0 && (l.env.idleTimeout > 0 || l.env.stallTimeout > 0) {
		earlier(l.nextSweep)
	}
	earlier(l.acceptPausedUntil)
	if next.IsZero() {
		return -1
	}
	return millisUntil(next)
}

func (l *spliceLoop) epollCtl(op, fd int, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if err := unix.EpollCtl(l.epfd, op, fd, &ev); err != nil {
		return fmt.Errorf("epoll ctl fd %d: %w", fd, err)
	}
	return nil
}

func (l *spliceLoop) track(s *spliceSocket) {
	for s.fd >= len(l.bySocket) {
		l.bySocket = append(l.bySocket, make([]*spliceSocket, len(l.bySocket)+1024)...)
	}
	l.bySocket[s.fd] = s
}

func (l *spliceLoop) untrack(s *spliceSocket) {
	if s.fd >= 0 && s.fd < len(l.bySocket) {
		l.bySocket[s.fd] = nil
	}
}

func (l *spliceLoop) dispatch(fd int, events uint32) {
	switch {
	case fd == l.lnfd && fd >= 0:
		l.acceptRun()
		return
	case fd == l.wakefd:
		var b [8]byte
		_, _ = unix.Read(l.wakefd, b[:])
		return
	}
	if fd >= len(l.bySocket) || l.bySocket[fd] == nil {
		return
	}
	s := l.bySocket[fd]
	c := s.conn
	if c.connecting {
		// Bytes or a FIN from the client wait in its socket: the pumps
		// look once the backend answered.
		if s == &c.backend {
			l.finishConnect(c)
		}
		return
	}
	if events&unix.EPOLLERR != 0 {
		if errno, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); errno != 0 {
			l.reset(c, "reset", unix.Errno(errno).Error()+" on the "+s.side()+" socket")
			return
		}
	}
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 && !l.pump(s.from) {
		return
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.to.blocked = false
		l.pump(s.to)
	}
}

func (l *spliceLoop) acceptRun() {
	for range maxAcceptRun {
		fd, client, err := acceptTCP(l.lnfd)
		switch {
		case err == nil:
			l.accepted.Add(1)
			l.startConn(fd, client)
		case errors.Is(err, unix.EAGAIN):
			return
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.ECONNABORTED):
			continue
		default:
			// EMFILE and the like: leave the rest queued in the backlog
			// and stop listening for a moment; the listener stays
			// readable, so waiting for it would spin.
			l.env.warn.Warn("accept", "accept failed, pausing accepts", "err", err, "pause", acceptPause, "active", len(l.conns))
			if l.epollCtl(unix.EPOLL_CTL_DEL, l.lnfd, 0) == nil {
				l.acceptPausedUntil = time.Now().Add(acceptPause)
			}
			return
		}
	}
}

// resumePumps gives the connections a pump left unfinished their turn.
func (l *spliceLoop) resumePumps() {
	if len(l.resume) == 0 {
		return
	}
	batch := l.resume
	l.resume = nil
	for _, c := range batch {
		c.resumeQueued = false
		if _, alive := l.conns[c]; !alive {
			continue
		}
		if l.pump(&c.toBackend) {
			l.pump(&c.toClient)
		}
	}
}

func (l *spliceLoop) checkConnects(now time.Time) {
	for c := range l.connecting {
		if now.After(c.deadline) {
			l.failConnect(c, fmt.Errorf("connect: timed out after %s", c.deadline.Sub(c.start).Round(time.Millisecond)))
		}
	}
}

// sweep closes connections idle both ways for the idle timeout and resets
// directions stalled for the stall timeout. Idleness comes from the time
// the pumps last moved a byte: no system call per connection, except for
// one that went quiet, whose send queues are read to tell idle from stuck.
func (l *spliceLoop) sweep(now time.Time) {
	stallDue := l.env.stallTimeout > 0 && !now.Before(l.nextStallSweep)
	if stallDue {
		l.nextStallSweep = now.Add(stallSweepPeriod(l.env.stallTimeout))
	}
	for c := range l.conns {
		if c.connecting {
			continue
		}
		if l.env.idleTimeout > 0 && now.Sub(c.lastActive) >= l.env.idleTimeout && c.quiet() {
			l.env.log.Debug("closing idle connection", "client", c.clientAddr, "backend", c.lease.Backend.ID, "idle", now.Sub(c.lastActive))
			l.teardown(c, false, "idle_timeout")
			continue
		}
		if stallDue && l.stalled(c, now) {
			l.env.warn.Warn("stall", "resetting a stalled connection: its receiver took no byte", "client", c.clientAddr,
				"backend", c.lease.Backend.ID, "stall_timeout", l.env.stallTimeout)
			l.reset(c, "stalled", "no progress")
		}
	}
}

// stalled reports whether a socket of c has bytes queued to send that its
// remote acknowledged none of for the stall timeout.
func (l *spliceLoop) stalled(c *spliceConn, now time.Time) bool {
	for _, s := range []*spliceSocket{&c.client, &c.backend} {
		info, err := unix.GetsockoptTCPInfo(s.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			continue
		}
		outq, err := unix.IoctlGetInt(s.fd, unix.SIOCOUTQ)
		if err != nil {
			continue
		}
		acked := info.Bytes_acked
		if outq == 0 || acked != s.stallAcked || s.stallSince.IsZero() {
			s.stallAcked, s.stallSince = acked, now
			continue
		}
		if now.Sub(s.stallSince) >= l.env.stallTimeout {
			return true
		}
	}
	return false
}
