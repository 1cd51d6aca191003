package userspace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// splicePlane copies each connection with io.Copy between *net.TCPConn,
// which the Go runtime turns into splice(2): no payload crosses userspace,
// but every connection costs two goroutines and two pipes.
type splicePlane struct {
	env    planeEnv
	active atomic.Int64
	// Dial is the backend dialer; a seam for tests.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

func newSplicePlane(env planeEnv) *splicePlane {
	d := &net.Dialer{}
	return &splicePlane{env: env, Dial: d.DialContext}
}

func (p *splicePlane) Name() string { return "splice" }

func (p *splicePlane) Stats() PlaneStats { return PlaneStats{Active: int(p.active.Load())} }

func (p *splicePlane) Serve(accept, stop context.Context, ln *net.TCPListener) error {
	var wg sync.WaitGroup
	conns := newConnSet()
	stopAccept := context.AfterFunc(accept, func() { ln.Close() })
	defer stopAccept()
	stopAll := context.AfterFunc(stop, conns.closeAll)
	defer stopAll()
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if accept.Err() != nil {
				wg.Wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors and similar: back off, keep serving.
			p.env.log.Warn("accept failed", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.handle(stop, c, conns)
		}()
	}
}

// handle owns client from here on: it is closed before handle returns.
func (p *splicePlane) handle(ctx context.Context, client *net.TCPConn, conns *connSet) {
	start := time.Now()
	clientAddr := client.RemoteAddr().(*net.TCPAddr).AddrPort()
	lease, reject := p.env.balancer.Acquire(clientAddr.Addr())
	if lease == nil {
		p.env.log.Debug("client rejected", "client", clientAddr, "reason", reject)
		client.SetLinger(0)
		client.Close()
		return
	}
	defer lease.Release()
	p.env.logOpen("splice", clientAddr, lease)
	p.active.Add(1)
	defer p.active.Add(-1)

	target := lease.Backend.AddrPort()
	dctx, cancel := context.WithTimeout(ctx, p.env.connectTimeout)
	bc, err := p.Dial(dctx, "tcp", target.String())
	cancel()
	if err != nil {
		lease.state.connectErrs.Add(1)
		p.env.log.Warn("dial backend failed", "client", clientAddr, "backend", lease.Backend.ID, "addr", target, "err", err)
		client.SetLinger(0)
		client.Close()
		p.env.onClose(ConnSummary{Client: clientAddr, Backend: lease.Backend.ID, Duration: time.Since(start), End: "connect_failed"})
		return
	}
	backend := bc.(*net.TCPConn)
	conns.add(client, backend)
	defer conns.remove(client, backend)

	in, out, end := spliceBoth(client, backend)
	lease.state.bytesIn.Add(uint64(in))
	lease.state.bytesOut.Add(uint64(out))
	p.env.onClose(ConnSummary{Client: clientAddr, Backend: lease.Backend.ID, BytesIn: uint64(in), BytesOut: uint64(out), Duration: time.Since(start), End: end})
}

// spliceBoth runs both copy loops until each direction has ended, then
// closes both connections. A reset on either side resets the other.
func spliceBoth(client, backend *net.TCPConn) (in, out int64, end string) {
	type result struct {
		toBackend bool
		n         int64
		err       error
	}
	results := make(chan result, 2)
	go func() {
		n, err := copyClientToBackend(backend, client)
		results <- result{true, n, err}
	}()
	go func() {
		n, err := copyBackendToClient(client, backend)
		results <- result{false, n, err}
	}()
	end = "closed"
	for range 2 {
		r := <-results
		if r.toBackend {
			in = r.n
		} else {
			out = r.n
		}
		if r.err != nil && end != "reset" {
			// The other loop may be blocked reading a side that will never
			// speak again: reset both so it returns at once.
			abort(client, backend)
			end = "reset"
		}
	}
	client.Close()
	backend.Close()
	return in, out, end
}

func copyClientToBackend(backend, client *net.TCPConn) (int64, error) {
	return copyHalf(backend, client)
}

func copyBackendToClient(client, backend *net.TCPConn) (int64, error) {
	return copyHalf(client, backend)
}

// copyHalf copies until src's EOF, then half-closes dst so the far side
// sees the FIN and can still send its reply.
func copyHalf(dst, src *net.TCPConn) (int64, error) {
	n, err := io.Copy(dst, src)
	if err != nil {
		return n, fmt.Errorf("copy %s -> %s: %w", src.RemoteAddr(), dst.RemoteAddr(), err)
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, fmt.Errorf("half-close %s: %w", dst.RemoteAddr(), err)
	}
	return n, nil
}

// abort resets both connections: linger 0 makes close send RST, which is
// how a reset on one side reaches the other.
func abort(a, b *net.TCPConn) {
	a.SetLinger(0)
	b.SetLinger(0)
	a.Close()
	b.Close()
}

// connSet tracks live connections so shutdown can close them.
type connSet struct {
	mu sync.Mutex
	m  map[*net.TCPConn]struct{}
}

func newConnSet() *connSet { return &connSet{m: map[*net.TCPConn]struct{}{}} }

func (s *connSet) add(cs ...*net.TCPConn) {
	s.mu.Lock()
	for _, c := range cs {
		s.m[c] = struct{}{}
	}
	s.mu.Unlock()
}

func (s *connSet) remove(cs ...*net.TCPConn) {
	s.mu.Lock()
	for _, c := range cs {
		delete(s.m, c)
	}
	s.mu.Unlock()
}

func (s *connSet) closeAll() {
	s.mu.Lock()
	for c := range s.m {
		c.Close()
	}
	s.mu.Unlock()
}
