//go:build linux

package userspace

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"golang.org/x/sys/unix"
)

// headerWaits are the connections of one event loop (either plane) whose
// trusted upstream has not sent its whole PROXY header yet. Nothing is
// routed and no backend slot is taken before the header is whole: such a
// connection holds only its place under the process cap (its descriptor
// counts), and is kept out of the loop's connections. Each socket is
// registered edge-triggered, so a prefix already looked at wakes the loop
// again only when more bytes (or a FIN) arrive; a header that never
// completes is refused by its deadline, never by a blocking read, so a
// slow upstream stalls neither the loop nor anyone else.
type headerWaits struct {
	env  planeEnv
	epfd int
	byFD map[int]*headerWait
	// queue is by deadline: every wait gets the same timeout, so arrival
	// order is deadline order and the earliest pending is at the front.
	// Entries finished meanwhile are skipped as they reach the front.
	queue []*headerWait
	buf   []byte // one peek, maxProxyHeaderLen bytes
	// takeRest: read what the client sent behind its header too (the
	// sockmap plane), see ready.
	takeRest bool
}

type headerWait struct {
	fd       int
	peer     netip.AddrPort
	deadline time.Time
	done     bool
}

// headerEvents: readable, or the upstream closed its side.
const headerEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET

func newHeaderWaits(env planeEnv, epfd int, takeRest bool) *headerWaits {
	return &headerWaits{env: env, epfd: epfd, byFD: map[int]*headerWait{}, takeRest: takeRest}
}

// begin starts waiting for fd's header. Registering the socket reports
// bytes that arrived with the handshake at once (ep_insert polls it).
func (w *headerWaits) begin(fd int, peer netip.AddrPort, now time.Time) {
	if !w.env.admission.reserve() {
		w.env.log.Debug("client refused", "client", peer, "reason", RejectMaxConns)
		closeWithReset(fd)
		return
	}
	ev := unix.EpollEvent{Events: headerEvents, Fd: int32(fd)}
	if err := unix.EpollCtl(w.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		w.env.admission.unreserve()
		w.env.warn.Warn("proxy_header:epoll", "cannot wait for a PROXY header", "peer", peer, "err", err)
		closeWithReset(fd)
		return
	}
	if w.buf == nil {
		w.buf = make([]byte, maxProxyHeaderLen)
	}
	hw := &headerWait{fd: fd, peer: peer, deadline: now.Add(w.env.proxyHeaders.wait())}
	w.byFD[fd] = hw
	w.queue = append(w.queue, hw)
}

// waiting reports whether fd is a socket waiting for its header.
func (w *headerWaits) waiting(fd int) bool {
	if len(w.byFD) == 0 {
		return false
	}
	_, ok := w.byFD[fd]
	return ok
}

func (w *headerWaits) pending() int { return len(w.byFD) }

// ready looks at what fd's upstream sent so far. Once the header is whole
// it consumes exactly the header's bytes (what the client sent after it
// stays in the socket for the data plane), takes the socket out of epoll
// and returns its origin with ok: the caller starts the connection, which
// already holds its place under the process cap.
//
// With takeRest it also reads every byte queued behind the header, into
// the origin's early bytes. The sockmap plane needs that: once the socket
// is in the sockhash, the verdict is fed by tcp_read_skb (net/ipv4/tcp.c),
// which takes whole skbs off the receive queue and ignores what recvmsg
// already copied of the first one, so a header that shared an skb with
// payload (HAProxy sends them in one segment) would be redirected to the
// backend again. Reading to EAGAIN leaves only whole skbs queued. The
// splice plane reads with splice(2) (tcp_read_sock, which honours
// copied_seq) and leaves the payload in the socket.
func (w *headerWaits) ready(fd int, events uint32) (o clientOrigin, ok bool) {
	hw := w.byFD[fd]
	n, _, err := unix.Recvfrom(fd, w.buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
		if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			w.refuse(hw, "truncated", "closed before any byte")
		}
		return o, false
	case err != nil:
		w.refuse(hw, "truncated", err.Error())
		return o, false
	case n == 0:
		w.refuse(hw, "truncated", "closed before any byte")
		return o, false
	}
	h, length, err := scanProxyHeader(w.buf[:n])
	if errors.Is(err, errHeaderIncomplete) {
		// RDHUP: the FIN is behind the bytes just peeked, so nothing
		// more will come.
		if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			w.refuse(hw, "truncated", fmt.Sprintf("closed after %d bytes of a header", n))
		}
		return o, false
	}
	if err != nil {
		w.refuse(hw, headerRefusalCause(err), err.Error())
		return o, false
	}
	// The header's bytes are in the receive queue (just peeked), so one
	// read of exactly its length takes them all and nothing after them.
	if m, err := unix.Read(fd, w.buf[:length]); err != nil || m != length {
		w.refuse(hw, "truncated", fmt.Sprintf("consume %d header bytes: read %d: %v", length, m, err))
		return o, false
	}
	o = originFromHeader(h, hw.peer)
	if w.takeRest {
		early, err := readQueued(fd)
		if err != nil {
			w.refuse(hw, "truncated", "read the bytes behind the header: "+err.Error())
			return clientOrigin{}, false
		}
		o.early = early
	}
	w.forget(hw)
	return o, true
}

// readQueued reads what fd has queued, up to EAGAIN or EOF (the FIN stays
// for the data plane to see). It is bounded by the socket's receive
// window: the client cannot send more before its header is answered.
func readQueued(fd int) ([]byte, error) {
	var out []byte
	chunk := make([]byte, 16<<10)
	for {
		n, err := unix.Read(fd, chunk)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return out, nil
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return nil, err
		case n == 0:
			return out, nil
		}
		out = append(out, chunk[:n]...)
	}
}

// forget takes hw out of epoll and of the waits; its socket stays open.
func (w *headerWaits) forget(hw *headerWait) {
	_ = unix.EpollCtl(w.epfd, unix.EPOLL_CTL_DEL, hw.fd, nil)
	delete(w.byFD, hw.fd)
	hw.done = true
}

// refuse closes a connection whose header was refused (RST: the upstream
// learns at once) and counts it: nothing reached a backend.
func (w *headerWaits) refuse(hw *headerWait, cause, detail string) {
	w.forget(hw)
	closeWithReset(hw.fd)
	w.env.admission.unreserve()
	w.env.balancer.countReject(RejectProxyProtocol)
	w.env.proxyHeaders.countRefusal(cause)
	w.env.warn.Warn("proxy_header:"+cause, "PROXY header refused, connection closed", "peer", hw.peer, "cause", cause, "detail", detail)
}

// expire refuses the headers whose deadline passed.
func (w *headerWaits) expire(now time.Time) {
	for len(w.queue) > 0 {
		hw := w.queue[0]
		if !hw.done && now.Before(hw.deadline) {
			return
		}
		w.queue[0] = nil
		w.queue = w.queue[1:]
		if !hw.done {
			w.refuse(hw, "timeout", fmt.Sprintf("no whole header within %s", w.env.proxyHeaders.wait()))
		}
	}
	w.queue = nil // empty: let the backing array go
}

// nextDeadline is the earliest deadline of a pending header; zero when
// none is pending.
func (w *headerWaits) nextDeadline() time.Time {
	for len(w.queue) > 0 && w.queue[0].done {
		w.queue[0] = nil
		w.queue = w.queue[1:]
	}
	if len(w.queue) == 0 {
		return time.Time{}
	}
	return w.queue[0].deadline
}

// closeAll resets every connection still waiting (the drain ended).
func (w *headerWaits) closeAll() {
	for _, hw := range w.byFD {
		w.forget(hw)
		closeWithReset(hw.fd)
		w.env.admission.unreserve()
	}
	w.queue = nil
}

// admitOrigin applies admission to a connection's client: the per-address
// limits to the header's client when a header came (its place under the
// process cap is already held), the whole admission otherwise.
func (e planeEnv) admitOrigin(o clientOrigin) (release func(), reason routing.RejectReason) {
	if o.reserved {
		return e.admission.admitReserved(o.client.Addr())
	}
	return e.admission.admit(o.client.Addr())
}

// untrustedHeader reports whether a client that is not a trusted upstream
// starts with a PROXY signature, while the feature is on: such a header is
// never interpreted, and the connection is refused instead of forwarding
// it. It looks once at what is already in the client's socket when the
// backend has answered, never waiting for bytes (a server-speaks-first
// protocol sends none); a header arriving later is plain payload.
func (e planeEnv) untrustedHeader(cfd int, o clientOrigin) bool {
	if !e.proxyHeaders.on() || o.upstream.IsValid() {
		return false
	}
	var b [16]byte
	n, _, err := unix.Recvfrom(cfd, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err != nil || n <= 0 || !carriesProxySignature(b[:n]) {
		return false
	}
	e.balancer.countReject(RejectProxyProtocol)
	e.proxyHeaders.countRefusal("untrusted")
	e.warn.Warn("proxy_header:untrusted", "PROXY header from a peer outside EDGEPROXY_PROXY_PROTOCOL_FROM, connection closed",
		"peer", o.client, "cause", "untrusted")
	return true
}

// sendProxyHeader writes the PROXY header backend expects, if any, to its
// freshly connected socket bfd, before any client byte: the client's bytes
// are forwarded after it, so they follow it in the stream. It returns the
// header's length. A new socket's send buffer takes a header (at most a
// few hundred bytes) whole, so a short write is an error.
func sendProxyHeader(bfd, cfd int, backend *routing.Backend, o clientOrigin) (int, error) {
	if backend.ProxyProtocol == 0 {
		return 0, nil
	}
	dst := o.dst
	if !dst.IsValid() {
		sa, err := unix.Getsockname(cfd)
		if err != nil {
			return 0, fmt.Errorf("client socket's local address: %w", err)
		}
		dst = sockaddrAddrPort(sa)
	}
	hdr, err := formatProxyHeader(backend.ProxyProtocol, o.client, dst)
	if err != nil {
		return 0, err
	}
	n, err := unix.Write(bfd, hdr)
	if err != nil {
		return 0, fmt.Errorf("send PROXY v%d header to backend %s: %w", backend.ProxyProtocol, backend.ID, err)
	}
	if n != len(hdr) {
		return 0, fmt.Errorf("send PROXY v%d header to backend %s: wrote %d of %d bytes", backend.ProxyProtocol, backend.ID, n, len(hdr))
	}
	return n, nil
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
