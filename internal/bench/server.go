package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The first byte a client sends picks what the backend does with the
// connection, so one backend port (one edgeproxy backend row) serves every
// workload. The mode byte is part of the payload: it is echoed or counted
// like any other byte.
const (
	modeEcho    = 'E' // echo through the Go runtime (connection rate, idle)
	modePing    = 'P' // echo on a dedicated OS thread with blocking I/O (round trip)
	modeDiscard = 'D' // discard; after the client's FIN, reply with the 8-byte count
)

// raiseNoFile lifts the soft open-file limit to the hard one.
func raiseNoFile() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

func serveMain(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "0.0.0.0:9000", "listen address")
	fs.IntVar(&pingCPU, "ping-cpu", -1, "pin each round-trip echo thread to this CPU (-1: anywhere)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	raiseNoFile()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	// The orchestrator waits for this line.
	fmt.Printf("READY %s\n", ln.Addr())
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				if tempDelay == 0 {
					tempDelay = 5 * time.Millisecond
				} else if tempDelay < time.Second {
					tempDelay *= 2
				}
				fmt.Fprintf(os.Stderr, "serve: accept: %v\n", err)
				time.Sleep(tempDelay)
				continue
			}
			return err
		}
		tempDelay = 0
		go handle(c.(*net.TCPConn))
	}
}

func handle(c *net.TCPConn) {
	buf := make([]byte, 64<<10)
	// A client that never names its mode is dropped after a while.
	_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
	n, err := c.Read(buf)
	if err != nil || n == 0 {
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	switch buf[0] {
	case modeEcho:
		defer c.Close()
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case modeDiscard:
		defer c.Close()
		total := int64(n)
		for {
			n, err := c.Read(buf)
			total += int64(n)
			if err != nil {
				if errors.Is(err, io.EOF) {
					var b [8]byte
					binary.BigEndian.PutUint64(b[:], uint64(total))
					_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
					_, _ = c.Write(b[:])
				}
				return
			}
		}
	case modePing:
		pingEcho(c, buf[:n])
	default:
		c.Close()
	}
}

// pingEcho echoes on a locked OS thread with a blocking descriptor, so the
// backend adds no netpoller wake-up to the round trip being measured.
func pingEcho(c *net.TCPConn, first []byte) {
	f, err := c.File() // a duplicate descriptor
	c.Close()          // leaves the poller; the duplicate keeps the socket
	if err != nil {
		return
	}
	defer f.Close()
	fd := int(f.Fd()) // Fd puts the descriptor in blocking mode
	// A pinned thread is not handed back: it exits with this goroutine
	// (still locked), so its affinity never leaks to other goroutines.
	runtime.LockOSThread()
	if pingCPU < 0 {
		defer runtime.UnlockOSThread()
	} else if err := pinThread(pingCPU); err != nil {
		fmt.Fprintf(os.Stderr, "serve: %v\n", err)
	}
	// A stalled or vanished peer must not pin this thread for ever.
	tv := unix.Timeval{Sec: 60}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if writeAll(fd, first, rawSyscalls) != nil {
		return
	}
	buf := make([]byte, 4096)
	for {
		n, err := sysRead(fd, buf, rawSyscalls)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n <= 0 {
			return
		}
		if writeAll(fd, buf[:n], rawSyscalls) != nil {
			return
		}
	}
}

// rawSyscalls makes the round-trip threads read and write with
// RawSyscall, outside the runtime's entersyscall/exitsyscall. With the
// ordinary path each blocking read of a round trip woke further runtime
// threads (perf sched_wakeup, client pinned to CPU 0 and backend to CPU 1:
// about 4 wake-ups per round trip against 2 for sockperf, round trip p50
// 90-140 µs against sockperf's 52-130 µs in the same placement; raw: 53-124
// µs). BENCH_PING_LEGACY=1 restores the old path to show the difference.
// A raw read that blocks keeps its P; that is harmless here because the
// thread is locked, nothing else runs in the process while it measures,
// and SO_RCVTIMEO makes a preemption signal end the read with EINTR.
var rawSyscalls = os.Getenv("BENCH_PING_LEGACY") != "1"

func sysRead(fd int, b []byte, raw bool) (int, error) {
	if !raw || len(b) == 0 {
		return unix.Read(fd, b)
	}
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}

func sysWrite(fd int, b []byte, raw bool) (int, error) {
	if !raw || len(b) == 0 {
		return unix.Write(fd, b)
	}
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return -1, e
	}
	return int(n), nil
}

// pingCPU is where round-trip echo threads run; -1: anywhere.
var pingCPU = -1

// pinThread binds the calling OS thread (locked by the caller) to cpu.
func pinThread(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin thread to CPU %d: %w", cpu, err)
	}
	return nil
}

func writeAll(fd int, b []byte, raw bool) error {
	for len(b) > 0 {
		n, err := sysWrite(fd, b, raw)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func readFull(fd int, b []byte, raw bool) error {
	for len(b) > 0 {
		n, err := sysRead(fd, b, raw)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		b = b[n:]
	}
	return nil
}
