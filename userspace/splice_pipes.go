package userspace

import (
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// splicePipeSize is the capacity asked of every pipe (F_SETPIPE_SZ), the
// most one splice(2) moves: the kernel reads at most the pipe's free slots
// from a socket (fs/splice.c, do_splice_read), so a 1 MiB pipe moves a bulk
// stream in 1 MiB steps, as the Go runtime's own splice does. 1 MiB is
// also the default fs.pipe-max-size. A pipe costs its slot array (256
// slots of 40 bytes) while it waits in the pool; pages only while bytes
// are in it.
const splicePipeSize = 1 << 20

const (
	// splicePipeShare: the plane opens at most one pipe per this many
	// connections of EDGEPROXY_MAX_CONNS (HAProxy's maxpipes default,
	// maxconn/4). A pipe is held only while a direction has bytes the
	// receiver has not taken yet, so this is plenty; a direction that
	// finds none free copies through userspace until one is.
	splicePipeShare = 4
	// minSplicePipes keeps small connection caps from starving bulk
	// transfers of pipes.
	minSplicePipes = 16
	// defaultSplicePipes applies when nothing caps the connections.
	defaultSplicePipes = 4096
	// idlePipesPerLoop is how many empty pipes a loop keeps open for the
	// next direction with bytes to move, so a busy loop does not open
	// and close a pipe (three system calls) per burst.
	idlePipesPerLoop = 8
)

// splicePipesFor is the most pipes the plane keeps open for a connection
// cap (0: no cap).
func splicePipesFor(maxConns int64) int {
	if maxConns <= 0 {
		return defaultSplicePipes
	}
	return max(int(maxConns/splicePipeShare), minSplicePipes)
}

// spliceConnsForFiles is how many connections the splice plane serves
// within files descriptors: 2 sockets each, plus 2 per pipe, at one pipe
// per splicePipeShare connections but never fewer than minSplicePipes
// (2c + 2*max(c/4, 16) <= files, solved for c without the max).
func spliceConnsForFiles(files uint64) uint64 {
	if files <= 2*minSplicePipes {
		return 0
	}
	return (files - 2*minSplicePipes) * splicePipeShare / (2*splicePipeShare + 2)
}

// pipeBudget counts pipes open across all loops against their bound.
type pipeBudget struct {
	limit int64
	open  atomic.Int64
}

func (b *pipeBudget) take() bool {
	if b.open.Add(1) > b.limit {
		b.open.Add(-1)
		return false
	}
	return true
}

func (b *pipeBudget) give() { b.open.Add(-1) }

// splicePipe is one pipe: bytes enter at w from a socket and leave at r
// to the other socket.
type splicePipe struct {
	r, w int
	size int // capacity in bytes, as the kernel granted it
}

// pipePool is one loop's idle pipes; only its loop touches it.
type pipePool struct {
	budget *pipeBudget
	idle   []*splicePipe
}

// get lends an empty pipe, or nil when the budget is spent or the host is
// out of descriptors: the caller then copies through userspace.
func (pp *pipePool) get() (*splicePipe, error) {
	if n := len(pp.idle); n > 0 {
		p := pp.idle[n-1]
		pp.idle = pp.idle[:n-1]
		return p, nil
	}
	if !pp.budget.take() {
		return nil, nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		pp.budget.give()
		return nil, fmt.Errorf("create pipe: %w", err)
	}
	// Refused beyond fs.pipe-max-size, or for an unprivileged user past
	// fs.pipe-user-pages-soft: the default 64 KiB pipe still works, in
	// smaller steps.
	_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, splicePipeSize)
	size, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETPIPE_SZ, 0)
	if err != nil || size <= 0 {
		size = 64 << 10
	}
	return &splicePipe{r: fds[0], w: fds[1], size: size}, nil
}

// put takes back an empty pipe.
func (pp *pipePool) put(p *splicePipe) {
	if len(pp.idle) < idlePipesPerLoop {
		pp.idle = append(pp.idle, p)
		return
	}
	pp.discard(p)
}

// discard closes a pipe, with whatever bytes it still holds.
func (pp *pipePool) discard(p *splicePipe) {
	unix.Close(p.r)
	unix.Close(p.w)
	pp.budget.give()
}

func (pp *pipePool) closeAll() {
	for _, p := range pp.idle {
		pp.discard(p)
	}
	pp.idle = nil
}

// fill moves what the socket src has queued into the pipe, as much as the
// pipe takes. 0 bytes is src's EOF.
func (p *splicePipe) fill(src int) (int, error) {
	for {
		n, err := unix.Splice(src, nil, p.w, nil, p.size, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(err, unix.EINTR) {
			return int(n), err
		}
	}
}

// drain moves up to n bytes of the pipe into the socket dst.
func (p *splicePipe) drain(dst, n int) (int, error) {
	for {
		m, err := unix.Splice(p.r, nil, dst, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(err, unix.EINTR) {
			return int(m), err
		}
	}
}

// release takes back a pipe whose direction ended: into the pool when it
// holds nothing, closed with the held bytes otherwise.
func (pp *pipePool) release(p *splicePipe, held int) {
	if held == 0 {
		pp.put(p)
	} else {
		pp.discard(p)
	}
}
