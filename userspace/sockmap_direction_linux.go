//go:build linux

package userspace

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"golang.org/x/sys/unix"
)

// A direction is the flow of bytes one socket receives, on their way to
// its peer: client to backend, or backend to client. Each connection has
// two, and each moves through the states below on its own. The kernel
// moves the bytes while the direction is armed; userspace moves them in
// every other state that moves bytes at all.
//
// The state is written only by (*direction).transition, which refuses a
// step the table below does not list. docs/architecture.md draws it.
type directionState uint8

const (
	// dirWaiting: the backend is being dialled. Bytes wait in the source
	// socket's receive queue; neither socket is in the sockhash yet.
	dirWaiting directionState = iota
	// dirUnpaired: the connection is young, or streams. Userspace moves
	// its bytes (read/write, or splice through a pipe once it streams)
	// until the connection shows it is worth pairing (pairAfterAge,
	// neither direction streaming): most connections end first and never
	// pay for the sockhash inserts, the psock set-up and teardown, or a
	// kernel worker's wake-up per message.
	dirUnpaired
	// dirCatchingUp: paired but unarmed. The verdict counts each skb and
	// passes it to the source's own queue; userspace reads exactly the
	// counted bytes, writes them to the peer, then arms.
	dirCatchingUp
	// dirArmed: the verdict redirects every skb to the peer's send path.
	// Userspace only watches the backlog and probes for EOF.
	dirArmed
	// dirPaused: disarmed because the receiver fell behind. Bytes
	// redirected before the pause may still wait in the peer's psock
	// queue; userspace reads nothing until they have reached the peer's
	// send queue, so its own writes cannot overtake them.
	dirPaused
	// dirCopying: the sockhash refused a socket that was already
	// half-closed when the connection was paired; userspace copies every
	// byte left of this connection.
	dirCopying
	// dirDraining: the source sent FIN and the byte count is final; the
	// FIN is passed on once every byte before it is in the peer's send
	// queue.
	dirDraining
	// dirClosed: the FIN was passed on (shutdown of the peer's sending
	// side). Nothing more moves this way.
	dirClosed
)

var directionStateNames = [...]string{
	dirWaiting:    "waiting",
	dirUnpaired:   "unpaired",
	dirCatchingUp: "catching_up",
	dirArmed:      "armed",
	dirPaused:     "paused",
	dirCopying:    "copying",
	dirDraining:   "draining",
	dirClosed:     "closed",
}

func (s directionState) String() string {
	if int(s) < len(directionStateNames) {
		return directionStateNames[s]
	}
	return fmt.Sprintf("directionState(%d)", s)
}

// directionEvent is what happened to a direction; transition maps it, with
// the current state, to the next state.
type directionEvent uint8

const (
	// evConnected: the backend answered; userspace copies until pairing.
	evConnected directionEvent = iota
	// evPaired: both sockets went into the sockhash, unarmed, with every
	// byte userspace had read already written to the peer.
	evPaired
	// evPairedForCopy: the sockhash refused a half-closed socket.
	evPairedForCopy
	// evArmed: the compare-and-swap that sets the armed bit succeeded,
	// with nothing counted that userspace had not forwarded.
	evArmed
	// evPaused: the compare-and-swap that clears the armed bit succeeded,
	// because the receiver left too many bytes unacknowledged.
	evPaused
	// evResumed: what was redirected before the pause has reached the
	// peer's send queue; userspace may forward passed bytes.
	evResumed
	// evEOF: the source's FIN was read, every byte before it counted.
	evEOF
	// evFINSent: the peer's sending side was shut down.
	evFINSent
)

var directionEventNames = [...]string{
	evConnected:     "connected",
	evPaired:        "paired",
	evPairedForCopy: "paired_for_copy",
	evArmed:         "armed",
	evPaused:        "paused",
	evResumed:       "resumed",
	evEOF:           "eof",
	evFINSent:       "fin_sent",
}

func (e directionEvent) String() string {
	if int(e) < len(directionEventNames) {
		return directionEventNames[e]
	}
	return fmt.Sprintf("directionEvent(%d)", e)
}

type directionStep struct {
	from directionState
	on   directionEvent
}

// directionTransitions is every legal step. Arming straight from paused
// is legal: when nothing was counted since the pause, redirected bytes
// queue behind the earlier ones in the same psock queue, in order.
var directionTransitions = map[directionStep]directionState{
	{dirWaiting, evConnected}:      dirUnpaired,
	{dirUnpaired, evPaired}:        dirCatchingUp,
	{dirUnpaired, evPairedForCopy}: dirCopying,
	{dirUnpaired, evEOF}:           dirDraining,
	{dirCatchingUp, evArmed}:       dirArmed,
	{dirArmed, evPaused}:           dirPaused,
	{dirArmed, evEOF}:              dirDraining,
	{dirPaused, evResumed}:         dirCatchingUp,
	{dirPaused, evArmed}:           dirArmed,
	{dirCopying, evEOF}:            dirDraining,
	{dirDraining, evFINSent}:       dirClosed,
}

// errIllegalTransition marks a step the table does not list: a bug in the
// plane, which resets the connection rather than guess.
var errIllegalTransition = errors.New("illegal direction transition")

// direction is one direction's state and userspace's bookkeeping for it.
// It is embedded in the endpoint whose socket receives the bytes.
type direction struct {
	state directionState

	settled uint64 // bytes received that are forwarded or redirected
	// copied is what userspace copied before the connection was paired
	// late: the verdict's count starts at zero behind it, and the peer's
	// base counts it as sent, so settled compares with both as before.
	copied uint64
	final  uint64 // the byte count at EOF
	// behind is how many reads were spent catching up since the direction
	// was last armed.
	behind int
	// pending was read from the source, not yet taken by the peer.
	pending []byte
	// pipe carries a streaming unpaired direction's bytes from the
	// source's receive queue to the peer by splice(2), without a copy
	// through userspace; inPipe is what it holds. It is borrowed from the
	// loop's pool only while bytes are in it.
	pipe   *splicePipe
	inPipe int
	// movedOut is what userspace wrote to the peer from pending or the
	// pipe: the idle sweep counts it as activity, since a slow receiver
	// taking those bytes leaves settled unchanged.
	movedOut uint64
	// streaming is set once a read of the unpaired direction filled the
	// whole buffer: more is queued than one read takes, so later reads
	// splice instead of copying.
	streaming bool
	// window counts the reads and bytes of the unpaired direction since
	// the tick last decided whether to pair (pairingWindow).
	window pairingWindow
	// lastSeen is the count at the last backlog check, lastSeenAt when
	// that check ran.
	lastSeen   uint64
	lastSeenAt time.Time
	// clamp is the window clamp to restore once armed, 0 when not clamped.
	// Catching up on passed bytes races the sender, whose window opens as
	// fast as userspace reads; a small window lets userspace win the race.
	clamp int
	// rcvbuf is the receive buffer to restore once armed again, 0 when not
	// shrunk: while paused, bytes wait in the source's own queue.
	rcvbuf int
	// armedAt is the count when the direction was last armed: bytes
	// counted beyond it were redirected by the kernel.
	armedAt uint64
	// redirected is set once a byte of this direction went through the
	// kernel's redirect path. Until then userspace wrote every byte into
	// the peer itself, so they are all in its send queue and passing on
	// the FIN needs no probe of that queue.
	redirected bool
	// ackedFloor is what the peer had acknowledged at the last look: the
	// backlog is at most count - ackedFloor, so while that is small the
	// backlog check costs no system call.
	ackedFloor uint64
	// peerSndbuf is the send buffer the peer had before bulk this way
	// raised it (sizeForBulk), 0 when not raised, -1 when it need not be;
	// peerSndbufSet is what it was raised to.
	peerSndbuf    int
	peerSndbufSet int
	// drainedAt and drained are when the receiver's acknowledged count
	// was last read and what it was: how fast it drains tells a slow
	// receiver from a kernel worker that fell behind for a moment.
	drainedAt time.Time
	drained   uint64
	// quiet is set once the armed direction's socket was registered
	// without EPOLLIN (epollArmed), after busyTicks ticks that moved
	// bytes.
	quiet     bool
	busyTicks int
	// pausedAt is when the direction last paused, zero once re-armed:
	// the debug log says how long each pause cost.
	pausedAt time.Time
}

// transition moves the direction on ev, or refuses a step the table does
// not list and leaves the state as it was.
func (d *direction) transition(ev directionEvent) error {
	next, ok := directionTransitions[directionStep{d.state, ev}]
	if !ok {
		return fmt.Errorf("%w: %s on %s", errIllegalTransition, d.state, ev)
	}
	d.state = next
	return nil
}

// ended is true once the source sent FIN: the count is final.
func (d *direction) ended() bool { return d.state == dirDraining || d.state == dirClosed }

const (
	// catchUpRounds is how many reads userspace may spend behind the
	// verdict's count before it narrows the sender's window to catch up.
	catchUpRounds = 4
	// maxForwardRounds bounds one forward call (readChunk each) so a busy
	// connection cannot starve the event loop.
	maxForwardRounds = 64
	// catchUpWindow is the receive window a sender gets while userspace
	// catches up: one small segment per round trip, so the verdict's
	// count stops outrunning userspace's reads, yet the flow never stops.
	catchUpWindow = 4096
	// pausedReceiveBuffer is the receive buffer of a paused direction's
	// source: the bytes its sender keeps sending wait there until
	// userspace forwards them, so it is what a paused direction parks on
	// top of its budget share. The kernel doubles it for bookkeeping
	// overhead and drops (for the sender to retransmit) what does not
	// fit, so the queue stays bounded even for the window it promised
	// before the pause.
	pausedReceiveBuffer = 128 << 10
	// minPauseBacklog keeps a direction's share of the budget large
	// enough to splice in the kernel at all: below a few dozen skbs every
	// burst would pause and fall back to userspace.
	minPauseBacklog = 256 << 10
	// maxPauseBacklog is the most redirected bytes one direction may have
	// unacknowledged before it pauses, whatever the budget: the kernel
	// itself bounds neither the psock queue nor the sender.
	maxPauseBacklog = 32 << 20
	// drainingTickBytes is what a receiver must acknowledge per tick for
	// its direction to use its whole budget share before pausing: 1 Gbit/s,
	// which drains a 32 MiB share in a quarter of a second. A slower
	// reader pauses at half its share, as every reader did before.
	drainingTickBytes = 625_000
)

// forward does userspace's share of moving src's bytes to its peer: it
// writes what is pending, reads bytes the verdict passed while the
// direction was unarmed, arms the direction once nothing is left, and
// notices EOF. It returns false when the connection was torn down.
func (p *sockmapPlane) forward(src *endpoint) bool {
	c := src.conn
	switch src.state {
	case dirWaiting, dirDraining, dirClosed:
		return true
	case dirCopying:
		return p.copyForward(src)
	case dirUnpaired:
		return p.copyForward(src)
	}
	dst := src.peer
	rounds := 0
	for {
		if done, alive := p.flushPending(src); !done {
			return alive
		}
		s := atomic.LoadUint64(src.flow)
		if s&loader.FlowArmed != 0 {
			break
		}
		count := s & loader.FlowCountMask
		if count == src.settled {
			if atomic.CompareAndSwapUint64(src.flow, s, s|loader.FlowArmed) {
				if !p.step(src, evArmed) {
					return false
				}
				src.armedAt = count
				src.behind = 0
				if !src.pausedAt.IsZero() {
					p.env.log.Debug("direction re-armed after a pause", "client", c.clientAddr, "socket", src.side(),
						"paused_for", time.Since(src.pausedAt))
					src.pausedAt = time.Time{}
				}
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
		if src.state == dirPaused {
			if sent, err := sentTo(dst); err != nil || sent < src.settled {
				p.watch(c)
				return true
			}
			if !p.step(src, evResumed) {
				return false
			}
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

// step applies ev to src's direction; an illegal step is a bug, logged
// loudly, and resets the connection. It returns false then.
func (p *sockmapPlane) step(src *endpoint, ev directionEvent) bool {
	was := src.state
	if err := src.transition(ev); err != nil {
		p.env.log.Error("sockmap plane bug", "client", src.conn.clientAddr, "socket", src.side(), "err", err)
		p.reset(src.conn, "reset", err.Error())
		return false
	}
	if was == dirArmed && src.quiet {
		// Paused or ended: userspace reads this socket again.
		src.quiet, src.busyTicks = false, 0
		p.reregister(src)
	}
	return true
}

// copyForward moves src's bytes to its peer through userspace: for a
// young connection not paired yet, and for the rare one that could not be
// spliced in the kernel.
func (p *sockmapPlane) copyForward(src *endpoint) bool {
	_, alive := p.drainCopy(src)
	return alive
}

// drainCopy reads src until it is empty and writes what it read to the
// peer. drained is true when the queue was found empty with nothing left
// pending: every byte src received so far is in the peer's send queue.
// A read shorter than the buffer found it empty: tcp_recvmsg stops short
// only when the receive queue and the socket's backlog are both empty,
// and a byte arriving after that wakes edge-triggered epoll again. Not
// once epoll reported a hang-up: a FIN queued behind the bytes is taken
// by that same read (found_fin_ok), so no later edge says so, and only
// the next read returning 0 shows it. The
// read that would only say EAGAIN is saved, one per message: a short
// connection's echo costs a read per direction, not two. Only while
// unpaired: a copying socket the sockhash kept is read through its psock
// (tcp_bpf_recvmsg), and that rare path keeps reading to EAGAIN.
// It stops after maxForwardRounds reads, for the tick to resume, so a
// fast sender cannot starve the other connections.
func (p *sockmapPlane) drainCopy(src *endpoint) (drained, alive bool) {
	// An empty pipe goes back to the pool whenever the loop leaves the
	// direction: one that went quiet, or ended, holds none.
	defer p.putEmptyPipe(src)
	for range maxForwardRounds {
		if done, alive := p.flushPending(src); !done {
			return false, alive
		}
		n, spliced, err := p.readSource(src)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return true, true
		case err != nil:
			p.reset(src.conn, "reset", "read copied bytes")
			return false, false
		case n == 0:
			src.final = src.settled
			return false, p.step(src, evEOF)
		}
		src.settled += uint64(n)
		src.window.add(n)
		src.conn.lastRead = p.now
		if spliced {
			// The pipe is flushed at the top of the next round; a short
			// splice proves nothing (a pipe fills by slots, not bytes),
			// so splicing goes on until the queue says EAGAIN.
			continue
		}
		if !p.writeOrKeep(src, p.buf[:n]) {
			return false, false
		}
		if n == len(p.buf) && src.state == dirUnpaired && !src.streaming {
			p.startStreaming(src)
		}
		if n < len(p.buf) && src.state == dirUnpaired && !src.hangup {
			return len(src.pending) == 0, true
		}
	}
	p.watch(src.conn)
	return false, true
}

// startStreaming has src's direction splice from now on. Its bytes wait
// in src's receive queue while the receiver is slow, as on the splice
// plane, so that queue is capped at the direction's share of the buffer
// budget, as the splice plane caps it (receiveLimit; the kernel doubles
// the value). Only a stream pays the system call: a request/response
// connection never fills a read.
func (p *sockmapPlane) startStreaming(src *endpoint) {
	src.streaming = true
	if limit := receiveLimit(p.env.bufferBudget, p.counters.active.Load()); limit > 0 {
		_ = unix.SetsockoptInt(src.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, limit/2)
	}
}

// putEmptyPipe gives src's pipe back to the pool once it holds nothing.
func (p *sockmapPlane) putEmptyPipe(src *endpoint) {
	if src.pipe != nil && src.inPipe == 0 {
		p.pipes.put(src.pipe)
		src.pipe = nil
	}
}

// readSource takes the next bytes of src's receive queue: into a pipe by
// splice(2) once an unpaired direction streams and a pipe is free, else
// into the loop's buffer. A socket in the sockhash (the rare copying
// direction) is read through its psock, which splice cannot do.
func (p *sockmapPlane) readSource(src *endpoint) (n int, spliced bool, err error) {
	if src.streaming && src.state == dirUnpaired {
		if src.pipe == nil {
			pipe, err := p.pipes.get()
			if err != nil {
				p.env.warn.Warn("pipe", "cannot open a pipe, copying through userspace", "client", src.conn.clientAddr, "err", err)
			}
			src.pipe = pipe
		}
		if src.pipe != nil {
			n, err := src.pipe.fill(src.fd)
			if n > 0 {
				src.inPipe = n
			}
			return n, true, err
		}
	}
	n, err = unix.Read(src.fd, p.buf)
	return n, false, err
}

// wroteToPeer counts n bytes of src's direction as moved to its peer, and
// says whether flushPending must stop: the peer is full (EPOLLOUT resumes
// it) or the connection was reset for err (alive false then).
func (p *sockmapPlane) wroteToPeer(src *endpoint, n int, err error, what string) (stop, alive bool) {
	if n > 0 {
		src.movedOut += uint64(n)
		countMoved(src.peer, n)
	}
	if errors.Is(err, unix.EAGAIN) {
		p.wantWritable(src.peer, true)
		return true, true
	}
	if err != nil {
		p.reset(src.conn, "reset", what+": "+err.Error())
		return true, false
	}
	return false, true
}

// flushPending writes what src's peer has not taken yet of the bytes
// userspace read from src. done is false while the peer is full (EPOLLOUT
// resumes it); alive is false when the connection was reset.
func (p *sockmapPlane) flushPending(src *endpoint) (done, alive bool) {
	dst := src.peer
	for src.inPipe > 0 {
		n, err := src.pipe.drain(dst.fd, src.inPipe)
		if n > 0 {
			src.inPipe -= n
		}
		if stop, alive := p.wroteToPeer(src, n, err, "splice to peer"); stop {
			return false, alive
		}
	}
	for len(src.pending) > 0 {
		n, err := unix.Write(dst.fd, src.pending)
		if n > 0 {
			src.pending = src.pending[n:]
		}
		if stop, alive := p.wroteToPeer(src, n, err, "write to peer"); stop {
			return false, alive
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

// countMoved adds bytes userspace wrote to dst to its backend's counters.
func countMoved(dst *endpoint, n int) {
	st := dst.conn.lease.state
	if dst == &dst.conn.backend {
		st.bytesIn.Add(uint64(n))
	} else {
		st.bytesOut.Add(uint64(n))
	}
}

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
	if unix.SetsockoptInt(src.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, catchUpWindow) == nil {
		src.clamp = orig
	}
}

func (p *sockmapPlane) unclamp(src *endpoint) {
	if src.clamp != 0 {
		_ = unix.SetsockoptInt(src.fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, src.clamp)
		src.clamp = 0
	}
}

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

// checkEOF looks for the remote's FIN on an armed socket. The verdict sets
// the FIN bit when the bare FIN skb reaches it, after every skb before it,
// so the count is final then and no system call is needed. A FIN that came
// with payload is invisible to the verdict; then recv, which takes the
// socket lock, proves it: once it returns 0 the verdict has seen every byte
// that came before the FIN.
func (p *sockmapPlane) checkEOF(src *endpoint) bool {
	if s := atomic.LoadUint64(src.flow); s&loader.FlowFIN != 0 {
		return p.endArmed(src, s&loader.FlowCountMask)
	}
	var b [1]byte
	n, _, err := unix.Recvfrom(src.fd, b[:], unix.MSG_DONTWAIT|unix.MSG_PEEK)
	switch {
	case errors.Is(err, unix.EAGAIN):
		return true
	case err != nil:
		p.reset(src.conn, "reset", "probe for EOF")
		return false
	case n == 0:
		return p.endArmed(src, atomic.LoadUint64(src.flow)&loader.FlowCountMask)
	}
	// Bytes in the socket's own queue while armed: a redirect failed
	// because the peer is gone.
	if s := atomic.LoadUint64(src.flow); s&loader.FlowArmed != 0 {
		p.reset(src.conn, "reset", "bytes left after redirect failed")
		return false
	}
	return true
}

// endArmed ends an armed direction whose source sent FIN after final bytes.
func (p *sockmapPlane) endArmed(src *endpoint, final uint64) bool {
	src.final = final
	if final > src.armedAt {
		src.redirected = true
	}
	return p.step(src, evEOF)
}

// checkBacklog bounds the bytes redirected into a peer's psock queue but
// not yet in its send buffer: the kernel bounds neither that queue nor the
// sender. Past pauseBacklog (a slow receiver, or a kernel worker far
// behind) it disarms the direction: the verdict then passes bytes to the
// socket's own queue, which its receive buffer bounds and TCP flow control
// throttles, and userspace forwards them as the receiver drains, then
// re-arms. (Narrowing the sender's window instead was tried: it cost a
// third of the bulk throughput and still let the queue grow.) A direction
// whose receiver acknowledges drainingTickBytes per tick is a stream
// whose kernel worker fell behind for a moment, not a slow reader: it may
// use its whole share (twice pauseBacklog) before it pauses, since every
// pause of a healthy stream costs a round of userspace copying.
func (p *sockmapPlane) checkBacklog(src *endpoint, now time.Time) {
	if src.state != dirArmed {
		return
	}
	s := atomic.LoadUint64(src.flow)
	count := s & loader.FlowCountMask
	if count == src.lastSeen {
		return
	}
	// What arrived in one tick will likely arrive again before the next
	// check: pausing on the backlog plus that growth keeps a fast sender
	// from overshooting its share by a tick's worth of bytes. The growth
	// is scaled to one tick: a loop that woke late (a busy machine) saw
	// several ticks' worth arrive, and counting all of it as the next
	// tick's paused healthy bulk streams for a backlog they never had.
	growth := tickGrowth(count-src.lastSeen, now.Sub(src.lastSeenAt), p.tick)
	src.lastSeen, src.lastSeenAt = count, now
	p.quietWhenBusy(src)
	limit := p.pauseBacklog()
	p.sizeForBulk(src, growth, limit)
	if count-min(src.ackedFloor, count)+growth < limit {
		// Even if the receiver acknowledged nothing since the last look,
		// the backlog is under the limit: no need to ask the kernel.
		return
	}
	// Everything the receiver has not acknowledged is parked here: the
	// psock queue, and the peer socket's send queue behind it.
	info, err := unix.GetsockoptTCPInfo(src.peer.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return
	}
	delivered := info.Bytes_acked - min(info.Bytes_acked, src.peer.base)
	src.ackedFloor = delivered
	if delivered > count {
		return
	}
	backlog := count - delivered
	draining := src.receiverDraining(delivered, now, p.tick)
	if backlog+growth < limit || (draining && backlog+growth < 2*limit) {
		return
	}
	for s&loader.FlowArmed != 0 {
		if atomic.CompareAndSwapUint64(src.flow, s, s&^loader.FlowArmed) {
			if !p.step(src, evPaused) {
				return
			}
			src.settled = s & loader.FlowCountMask
			if src.settled > src.armedAt {
				src.redirected = true
			}
			src.pausedAt = now
			p.shrinkReceive(src)
			p.watch(src.conn)
			p.env.log.Debug("direction paused for a slow receiver", "client", src.conn.clientAddr,
				"socket", src.side(), "backlog", backlog, "growth", growth, "receiver_draining", draining)
			return
		}
		s = atomic.LoadUint64(src.flow)
	}
}

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

// settledTotal is every byte of src's direction that has moved on since
// pairing: the verdict's count once the kernel splices, userspace's own
// while copying (flow is set only when both sockets went into the
// sockhash). Bytes copied before a late pairing are in copied.
func (ep *endpoint) settledTotal() uint64 {
	if ep.flow == nil {
		return ep.settled
	}
	return atomic.LoadUint64(ep.flow) & loader.FlowCountMask
}

// tickGrowth scales what a direction received over elapsed to one tick.
func tickGrowth(received uint64, elapsed, tick time.Duration) uint64 {
	if elapsed <= tick {
		return received
	}
	return uint64(float64(received) * float64(tick) / float64(elapsed))
}

// receiverDraining reads whether the receiver of src's direction
// acknowledged at least drainingTickBytes per tick since the last look:
// the backlog is then a kernel worker behind a fast stream, not a slow
// reader.
func (d *direction) receiverDraining(delivered uint64, now time.Time, tick time.Duration) bool {
	prev, prevAt := d.drained, d.drainedAt
	d.drained, d.drainedAt = delivered, now
	if prevAt.IsZero() || delivered < prev {
		return false
	}
	return tickGrowth(delivered-prev, now.Sub(prevAt), tick) >= drainingTickBytes
}
