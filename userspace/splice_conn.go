package userspace

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// spliceConn is one client connection and its backend on the splice
// plane, owned by the loop that accepted it.
type spliceConn struct {
	client, backend     spliceSocket
	toBackend, toClient spliceDirection
	lease               *Lease
	release             func() // gives back the admission slot
	clientAddr          netip.AddrPort
	origin              clientOrigin // who it serves, per a PROXY header if one came
	start               time.Time
	deadline            time.Time // this connect attempt's deadline
	connectBy           time.Time // every attempt's deadline together
	connecting          bool
	resumeQueued        bool // in the loop's resume list
	// lastActive is when a byte last moved either way, to the loop's
	// clock (the idle sweep's).
	lastActive time.Time
}

// spliceSocket is one socket of a connection.
type spliceSocket struct {
	conn *spliceConn
	fd   int
	// from is the direction that reads this socket, to the one that
	// writes it.
	from, to *spliceDirection
	// stallAcked and stallSince track what this socket's remote
	// acknowledged, for the stall check.
	stallAcked uint64
	stallSince time.Time
}

// spliceDirection is the flow of bytes from one socket to the other. Its
// bytes are in one of three places: in src's receive queue (not read
// yet), in the borrowed pipe or pending (read, dst has not taken them),
// or in dst's send queue. It holds a pipe only while bytes are in it.
type spliceDirection struct {
	src, dst *spliceSocket
	pipe     *splicePipe
	inPipe   int    // bytes in pipe
	pending  []byte // bytes copied from src that dst has not taken (no pipe was free)
	moved    uint64 // bytes dst has taken
	eof      bool   // src sent FIN and every byte before it was read
	shut     bool   // dst was sent FIN
	// blocked: dst refused bytes (EAGAIN); only its EPOLLOUT resumes the
	// direction. Until then src's arrivals cost no system call: TCP
	// reports write space to a writer that found none (SOCK_NOSPACE is
	// set on that path in tcp_sendmsg_locked), so the edge is not lost.
	blocked bool
}

func (s *spliceSocket) side() string {
	if s == &s.conn.client {
		return "client"
	}
	return "backend"
}

// quiet reports whether nothing of c waits anywhere: not in a pipe, not
// pending, not in either socket's send queue. An idle connection closes
// with an orderly FIN only then; otherwise it is a stall.
func (c *spliceConn) quiet() bool {
	for _, d := range []*spliceDirection{&c.toBackend, &c.toClient} {
		if d.inPipe > 0 || len(d.pending) > 0 {
			return false
		}
		if outq, err := unix.IoctlGetInt(d.dst.fd, unix.SIOCOUTQ); err != nil || outq > 0 {
			return false
		}
	}
	return true
}

func (l *spliceLoop) startConn(cfd int, origin clientOrigin) {
	client := origin.client
	release, reject := l.env.admitOrigin(origin)
	if release == nil {
		l.env.log.Debug("client refused", "client", client, "reason", reject)
		closeWithReset(cfd)
		return
	}
	lease, reject := l.env.balancer.Acquire(client.Addr())
	if lease == nil {
		release()
		l.env.log.Debug("client rejected", "client", client, "reason", reject)
		closeWithReset(cfd)
		return
	}
	l.env.logOpen("splice", client, lease)
	now := time.Now()
	c := &spliceConn{lease: lease, release: release, clientAddr: client, origin: origin, start: now, lastActive: now}
	c.connectBy = now.Add(l.env.connectTimeout)
	c.client = spliceSocket{conn: c, fd: cfd, from: &c.toBackend, to: &c.toClient}
	c.backend = spliceSocket{conn: c, fd: -1, from: &c.toClient, to: &c.toBackend}
	c.toBackend = spliceDirection{src: &c.client, dst: &c.backend}
	c.toClient = spliceDirection{src: &c.backend, dst: &c.client}
	l.conns[c] = struct{}{}
	l.shared.active.Add(1)
	l.track(&c.client)
	// Registered now so a FIN or reset during the dial is not lost; the
	// pumps read what the client sent once the backend answers.
	if err := l.epollCtl(unix.EPOLL_CTL_ADD, cfd, spliceEvents); err != nil {
		l.reset(c, "reset", err.Error())
		return
	}
	l.dial(c)
}

// dial starts a non-blocking connect to the lease's backend. Bytes the
// client sends meanwhile wait in its socket's receive queue, so whichever
// backend answers gets them all.
func (l *spliceLoop) dial(c *spliceConn) {
	now := time.Now()
	c.connecting = true
	l.connecting[c] = struct{}{}
	c.deadline = now.Add(attemptTimeout(c.connectBy, now, c.lease.AttemptsLeft(l.env.retries)))
	target := c.lease.Backend.AddrPort()
	family := unix.AF_INET6
	if target.Addr().Is4() {
		family = unix.AF_INET
	}
	bfd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		l.failConnect(c, fmt.Errorf("create backend socket: %w", err))
		return
	}
	c.backend.fd = bfd
	l.track(&c.backend)
	_ = unix.SetsockoptInt(bfd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	_ = setKeepalive(bfd, l.env.keepalive)
	sa, err := backendSockaddr(target)
	if err != nil {
		l.failConnect(c, err)
		return
	}
	if err := unix.Connect(bfd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		l.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	// Writable (or an error) once the handshake ended either way.
	if err := l.epollCtl(unix.EPOLL_CTL_ADD, bfd, spliceEvents); err != nil {
		l.failConnect(c, err)
	}
}

// failConnect handles a dial that did not produce a connection. A dial
// this host could not even start (out of descriptors) is refused as
// max_conns and says nothing about the backend. Otherwise it counts
// against the backend's health and the next best backend is tried, while
// attempts and time are left.
func (l *spliceLoop) failConnect(c *spliceConn, err error) {
	if c.backend.fd >= 0 {
		l.untrack(&c.backend)
		unix.Close(c.backend.fd)
		c.backend.fd = -1
	}
	next, reason, cause := l.env.afterFailedDial("splice", c.clientAddr, c.lease, c.connectBy, err)
	if next == nil {
		l.reset(c, reason, cause)
		return
	}
	c.lease = next
	l.dial(c)
}

func (l *spliceLoop) finishConnect(c *spliceConn) {
	errno, err := unix.GetsockoptInt(c.backend.fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && errno == 0 {
		// Still in progress (an early edge): SO_ERROR is 0 both then and
		// once connected; only a connected socket has a peer.
		if _, perr := unix.Getpeername(c.backend.fd); perr != nil {
			if errors.Is(perr, unix.ENOTCONN) {
				return
			}
			err = perr
		}
	}
	if err != nil || errno != 0 {
		if err == nil {
			err = unix.Errno(errno)
		}
		l.failConnect(c, fmt.Errorf("connect: %w", err))
		return
	}
	if l.env.untrustedHeader(c.client.fd, c.origin) {
		c.lease.Connected()
		l.reset(c, "proxy_protocol", "PROXY header from an untrusted peer")
		return
	}
	// Before the pumps run: the client's bytes follow the header.
	if _, err := sendProxyHeader(c.backend.fd, c.client.fd, &c.lease.Backend, c.origin); err != nil {
		l.failConnect(c, err)
		return
	}
	c.connecting = false
	delete(l.connecting, c)
	c.lease.Connected()
	if limit := receiveLimit(l.env.bufferBudget, l.shared.active.Load()); limit > 0 {
		// Bytes a stopped reader's peer keeps sending park in the receive
		// queue of the socket they arrive on: cap it at this connection's
		// share of the buffer budget (the kernel doubles the value).
		_ = unix.SetsockoptInt(c.client.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, limit/2)
		_ = unix.SetsockoptInt(c.backend.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, limit/2)
	}
	// Edge-triggered: what arrived before now was reported while the
	// dial was in flight (and ignored), so look at both ways once.
	if l.pump(&c.toBackend) {
		l.pump(&c.toClient)
	}
}

// pump moves what d's source has to d's destination until the source has
// nothing more, the destination takes no more (its EPOLLOUT resumes), or
// the round bound is hit (the loop resumes). At the source's EOF, with
// every byte delivered, it half-closes the destination; with both
// directions shut it closes the connection. It returns false when the
// connection was torn down.
func (l *spliceLoop) pump(d *spliceDirection) bool {
	c := d.src.conn
	if c.connecting || d.shut || d.blocked {
		return true
	}
	defer l.returnPipe(d)
	for range maxPumpRounds {
		// First what was read before: bytes never overtake each other.
		if done, alive := l.flush(d); !done {
			return alive
		}
		if d.eof {
			return l.halfClose(d)
		}
		if d.pipe == nil {
			p, err := l.pipes.get()
			if err != nil {
				l.env.warn.Warn("pipe", "cannot open a pipe, copying through userspace", "client", c.clientAddr, "err", err)
			}
			d.pipe = p
		}
		var n int
		var err error
		if d.pipe != nil {
			n, err = d.pipe.fill(d.src.fd)
		} else {
			n, err = unix.Read(d.src.fd, l.buf)
		}
		switch {
		case errors.Is(err, unix.EAGAIN):
			return true
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			l.reset(c, "reset", fmt.Sprintf("read %s: %v", d.src.side(), err))
			return false
		case n == 0:
			d.eof = true
			continue
		}
		if d.pipe != nil {
			d.inPipe = n
		} else {
			d.pending = append(d.pending[:0], l.buf[:n]...)
		}
	}
	l.resumeLater(c)
	return true
}

// flush writes what d has read and its destination has not taken yet.
// done is false while the destination is full; alive is false when the
// connection was reset.
func (l *spliceLoop) flush(d *spliceDirection) (done, alive bool) {
	for d.inPipe > 0 || len(d.pending) > 0 {
		var n int
		var err error
		if d.inPipe > 0 {
			n, err = d.pipe.drain(d.dst.fd, d.inPipe)
		} else {
			n, err = unix.Write(d.dst.fd, d.pending)
		}
		if n > 0 {
			l.moved(d, n)
		}
		switch {
		case errors.Is(err, unix.EAGAIN):
			d.blocked = true
			return false, true
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			l.reset(d.src.conn, "reset", fmt.Sprintf("write %s: %v", d.dst.side(), err))
			return false, false
		}
	}
	return true, true
}

func (l *spliceLoop) moved(d *spliceDirection, n int) {
	d.moved += uint64(n)
	d.src.conn.lastActive = l.now
	if d.inPipe > 0 {
		d.inPipe -= n
	} else {
		d.pending = d.pending[n:]
		if len(d.pending) == 0 {
			d.pending = nil // the copy's backing array goes with it
		}
	}
	st := d.src.conn.lease.state
	if d.dst == &d.dst.conn.backend {
		st.bytesIn.Add(uint64(n))
	} else {
		st.bytesOut.Add(uint64(n))
	}
}

// returnPipe gives d's pipe back once it is empty: an idle direction
// holds none.
func (l *spliceLoop) returnPipe(d *spliceDirection) {
	if d.pipe != nil && d.inPipe == 0 {
		l.pipes.put(d.pipe)
		d.pipe = nil
	}
}

// halfClose sends the FIN d's source sent, after every byte before it,
// and closes the connection once both directions have.
func (l *spliceLoop) halfClose(d *spliceDirection) bool {
	c := d.src.conn
	if err := unix.Shutdown(d.dst.fd, unix.SHUT_WR); err != nil {
		l.reset(c, "reset", fmt.Sprintf("half-close %s: %v", d.dst.side(), err))
		return false
	}
	d.shut = true
	if c.toBackend.shut && c.toClient.shut {
		l.teardown(c, false, "closed")
		return false
	}
	return true
}

func (l *spliceLoop) resumeLater(c *spliceConn) {
	if !c.resumeQueued {
		c.resumeQueued = true
		l.resume = append(l.resume, c)
	}
}

// reset ends a connection at once; both remotes see RST.
func (l *spliceLoop) reset(c *spliceConn, how, cause string) {
	if _, ok := l.conns[c]; ok {
		l.env.log.Debug("connection aborted", "client", c.clientAddr, "backend", c.lease.Backend.ID, "cause", cause)
	}
	l.teardown(c, true, how)
}

func (l *spliceLoop) teardown(c *spliceConn, hard bool, how string) {
	if _, ok := l.conns[c]; !ok {
		return
	}
	delete(l.conns, c)
	delete(l.connecting, c)
	l.shared.active.Add(-1)
	for _, d := range []*spliceDirection{&c.toBackend, &c.toClient} {
		if d.pipe != nil {
			l.pipes.release(d.pipe, d.inPipe)
			d.pipe, d.inPipe = nil, 0
		}
		d.pending = nil
	}
	for _, s := range []*spliceSocket{&c.client, &c.backend} {
		if s.fd < 0 {
			continue
		}
		l.untrack(s)
		if hard {
			closeWithReset(s.fd)
		} else {
			unix.Close(s.fd)
		}
		s.fd = -1
	}
	c.lease.Release()
	c.release()
	l.env.onClose(ConnSummary{
		Client: c.clientAddr, Backend: c.lease.Backend.ID,
		BytesIn: c.toBackend.moved, BytesOut: c.toClient.moved, Duration: time.Since(c.start), End: how, Dataplane: "splice",
	})
}
