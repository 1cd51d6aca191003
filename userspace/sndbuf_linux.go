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

// Why spliced sockets get a large send buffer while they carry bulk.
//
// The kernel's psock worker (sk_psock_backlog, net/core/skmsg.c) moves
// redirected skbs into the peer socket's send queue. When that socket is
// not writable (sock_writeable: the queue's memory is past half of
// sk_sndbuf) it gets -EAGAIN and re-queues itself with
// schedule_delayed_work(&psock->work, 1): one jiffy later. The write-space
// callback's schedule_delayed_work(..., 0) cannot shorten a delay already
// pending, so each full send buffer idles the direction for a whole jiffy
// (4 ms at HZ=250), which caps one bulk stream near 5 Gbit/s here.
//
// The buffer must therefore hold what the stream brings in during one
// jiffy, twice over (only half of sk_sndbuf may be in use before the
// socket stops being writable), and twice again for skb overhead
// (truesize against payload): 4 x rate / HZ, rounded up to a power of two.
// At 10 Gbit/s that is 32 MiB at HZ=250 (8 MiB measured too small,
// 32 MiB enough), 8 MiB at HZ=1000 and 64 MiB at HZ=100.
//
// A send buffer is a limit, not an allocation: an idle socket costs the
// same whatever it is. It is raised only for a direction that moves bulk,
// and never beyond what the buffer budget (EDGEPROXY_MAX_BUFFERED_MB)
// grants one direction, so a stopped reader parks at most its share.

// bulkLineRate is the rate, in bytes per second, one stream should reach
// without meeting a full send buffer: a 10 Gbit/s link.
const bulkLineRate = 10e9 / 8

// bulkTickBytes is how much one direction must move in one tick of the
// event loop (5 ms) to count as bulk: 100 Mbit/s.
const bulkTickBytes = 64 << 10

// bulkSendBuffer is the send buffer that spans one jiffy at bulkLineRate.
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

// sizeForBulk raises dst's send buffer once the direction into it moved
// bulkTickBytes in one tick, to what one jiffy at line rate needs, capped
// by the direction's budget share (half of a send buffer is usable). The
// buffer it had is kept to restore when the direction pauses.
func (p *sockmapPlane) sizeForBulk(dst *endpoint, growth uint64) {
	if dst.sndbuf != 0 || growth < bulkTickBytes {
		return
	}
	want := min(bulkSendBuffer(kernelHZ()), int(2*p.pauseBacklog()))
	orig, err := unix.GetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil || orig >= want {
		dst.sndbuf = -1 // large enough already: never look again
		return
	}
	// The kernel doubles the value for bookkeeping, as it reports it.
	if unix.SetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, want/2) != nil {
		dst.sndbuf = -1 // no CAP_NET_ADMIN: autotuning it stays
		return
	}
	dst.sndbuf = orig
}

// unsizeForBulk gives a paused direction's receiver its send buffer back:
// a slow reader must not keep a bulk-sized queue.
func (p *sockmapPlane) unsizeForBulk(dst *endpoint) {
	if dst.sndbuf > 0 {
		_ = unix.SetsockoptInt(dst.fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, dst.sndbuf/2)
	}
	dst.sndbuf = 0
}
