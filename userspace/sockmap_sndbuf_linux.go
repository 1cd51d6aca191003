//go:build linux

package userspace

import (
	"bufio"
	"compress/gzip"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Why a bulk direction's receiver gets a large send buffer.
//
// The kernel's psock worker (sk_psock_backlog, net/core/skmsg.c) moves
// each redirected skb into the peer socket with skb_send_sock, which ends
// in tcp_sendmsg under MSG_DONTWAIT. When the peer's send queue is full
// (sk_wmem_queued has reached sk_sndbuf; or sock_writeable fails, which
// sk_psock_handle_skb checks first) it gets -EAGAIN and re-queues itself
// with schedule_delayed_work(&psock->work, 1): one jiffy later. The
// write-space callback's schedule_delayed_work(..., 0) cannot shorten a
// delay already pending, so each full send buffer idles the direction for
// up to a jiffy (4 ms at HZ=250), and the receiver drains the queue
// meanwhile. If the queue holds less than a jiffy at line rate, the link
// goes idle: scripts/psock-stalls.bt counts these stalls.
//
// The send buffer must therefore hold one jiffy at line rate in payload.
// It is counted in skb truesize, up to about twice the payload on veth,
// and the worker, once its timer fires, still waits for a CPU behind
// softirq and the other runnable work: twice again. So 4 x rate / HZ,
// rounded up to a power of two: at 10 Gbit/s 32 MiB at HZ=250 (8 MiB
// measured too small here), 8 MiB at HZ=1000, 64 MiB at HZ=100.
//
// A send buffer is a limit, not an allocation: an idle socket costs the
// same whatever it is. It is raised only once a direction moves bulk
// (bulkTickBytes in one tick), and never past half the direction's share
// of EDGEPROXY_MAX_BUFFERED_MB (pauseBacklog): the pause counts everything
// the receiver has not acknowledged, send queue included, and the other
// half is for the psock queue in front of it, which the kernel does not
// bound. When more connections shrink the share, the buffer is brought
// down with it, so a slow reader that was once a bulk stream parks no more
// than any other.

// bulkLineRate is the rate, in bytes per second, one stream should reach
// without meeting a full send buffer: a 10 Gbit/s link.
const bulkLineRate = 10e9 / 8

// bulkTickBytes is how much one direction must move in one tick of the
// event loop (5 ms) to count as bulk: 100 Mbit/s. Request/response and
// idle connections stay below it and keep the kernel's autotuned buffer.
const bulkTickBytes = 64 << 10

// bulkSendBuffer is the send buffer that spans one jiffy at bulkLineRate
// with room for skb overhead and the worker's wake-up (see above).
func bulkSendBuffer(hz int) int {
	need := 4 * bulkLineRate / float64(max(hz, 1))
	size := 1 << 20
	for float64(size) < need {
		size <<= 1
	}
	return size
}

var (
	kernelHZOnce sync.Once
	kernelHZVal  int
)

// kernelHZ is the kernel's tick rate from its build configuration, or
// 100 (the longest jiffy, so the largest buffer) when it cannot be read.
// Userspace never sees HZ otherwise: sysconf's clock ticks are USER_HZ.
func kernelHZ() int {
	kernelHZOnce.Do(func() {
		kernelHZVal = 100
		if hz, ok := configHZ(); ok {
			kernelHZVal = hz
		}
	})
	return kernelHZVal
}

func configHZ() (int, bool) {
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		if z, err := gzip.NewReader(f); err == nil {
			if hz, ok := scanHZ(z); ok {
				return hz, true
			}
		}
	}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		release := unix.ByteSliceToString(uts.Release[:])
		if f, err := os.Open("/boot/config-" + release); err == nil {
			defer f.Close()
			return scanHZ(f)
		}
	}
	return 0, false
}

func scanHZ(r io.Reader) (int, bool) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ="); ok {
			hz, err := strconv.Atoi(v)
			return hz, err == nil && hz > 0
		}
	}
	return 0, false
}

// sizeForBulk raises the send buffer of src's peer once src's direction
// moved bulkTickBytes in one tick, to what one jiffy at line rate needs,
// never past half the direction's share of the budget (pauseAt). The
// share shrinks as connections open: a buffer raised past the bound in
// force now is brought down to it, so a slow reader that was a bulk
// stream once parks no more than a fresh one. A pause keeps the buffer:
// the bytes already redirected land in it either way, and a smaller one
// would only move them there one jiffy stall at a time.
func (p *sockmapPlane) sizeForBulk(src *endpoint, growth, pauseAt uint64) {
	bound := int(pauseAt)
	if src.peerSndbuf > 0 && src.peerSndbufSet > bound {
		src.peerSndbufSet = max(bound, src.peerSndbuf)
		_ = unix.SetsockoptInt(src.peer.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, src.peerSndbufSet/2)
		return
	}
	if src.peerSndbuf != 0 || growth < bulkTickBytes {
		return
	}
	dst := src.peer
	want := min(bulkSendBuffer(kernelHZ()), bound)
	orig, err := unix.GetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil || orig >= want {
		src.peerSndbuf = -1 // large enough already: never look again
		return
	}
	// The kernel doubles the value for bookkeeping, as it reports it.
	if unix.SetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, want/2) != nil {
		src.peerSndbuf = -1 // no CAP_NET_ADMIN: autotuning stays
		return
	}
	src.peerSndbuf, src.peerSndbufSet = orig, want
}
