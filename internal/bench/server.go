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
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// A stalled or vanished peer must not pin this thread for ever.
	tv := unix.Timeval{Sec: 60}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if writeAll(fd, first) != nil {
		return
	}
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n <= 0 {
			return
		}
		if writeAll(fd, buf[:n]) != nil {
			return
		}
	}
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
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

func readFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Read(fd, b)
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
