//go:build linux

package nettest

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// Handler serves one accepted connection; the server closes it afterwards.
type Handler func(c *net.TCPConn)

// Server is a TCP server inside a namespace.
type Server struct {
	Addr string
	ln   *net.TCPListener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[*net.TCPConn]struct{}
}

// Serve listens on addr inside ns (nil: the test's own namespace) and runs h
// for each connection. Cleanup closes the listener and every connection.
func Serve(t testing.TB, ns *NS, addr string, h Handler) *Server {
	t.Helper()
	var ln net.Listener
	listen := func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}
	var err error
	if ns == nil {
		err = listen()
	} else {
		err = ns.Do(listen)
	}
	if err != nil {
		t.Fatalf("listen on %s: %v", addr, err)
	}
	s := &Server{Addr: ln.Addr().String(), ln: ln.(*net.TCPListener), open: map[*net.TCPConn]struct{}{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.AcceptTCP()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.open[c] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				h(c)
				c.Close()
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(s.Close)
	return s
}

// Close stops the server and closes its connections.
func (s *Server) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Greeter writes "hello from ID\n" the instant it accepts, then echoes
// until the client's FIN and half-closes.
func Greeter(id string) Handler {
	greeting := []byte("hello from " + id + "\n")
	return func(c *net.TCPConn) {
		if _, err := c.Write(greeting); err != nil {
			return
		}
		Echo(c)
	}
}

// Echo copies everything back until EOF, then half-closes.
func Echo(c *net.TCPConn) {
	if _, err := io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c}); err != nil {
		return
	}
	_ = c.CloseWrite()
}

// Dial connects from inside ns (nil: the test's own namespace).
func Dial(ns *NS, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	dial := func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	}
	var err error
	if ns == nil {
		err = dial()
	} else {
		err = ns.Do(dial)
	}
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// DialFrom connects from inside ns with the local address bound to
// localIP, for a host with more than one address.
func DialFrom(ns *NS, localIP, addr string, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// MustReach dials addr from ns, reads the greeting and checks it names
// wantID.
func MustReach(t testing.TB, ns *NS, addr, wantID string) {
	t.Helper()
	c, err := Dial(ns, addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	got, err := ReadLine(c, 2*time.Second)
	if err != nil {
		t.Fatalf("read greeting through %s: %v", addr, err)
	}
	if want := "hello from " + wantID; got != want {
		t.Fatalf("greeting through %s = %q, want %q", addr, got, want)
	}
}

// ReadLine reads one line (without the newline) within timeout.
func ReadLine(c net.Conn, timeout time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return string(line), err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
}

// Stream is a deterministic byte stream: the same seed and length give the
// same bytes on both ends without holding them in memory.
type Stream struct{ rng *rand.ChaCha8 }

// NewStream returns the stream for seed.
func NewStream(seed uint64) *Stream {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return &Stream{rng: rand.NewChaCha8(key)}
}

func (s *Stream) Read(p []byte) (int, error) {
	return s.rng.Read(p)
}

// Exchange is the handler for byte-exact tests. The client sends a 16-byte
// header (seed, length) and then its payload until FIN; the server sends
// `length` bytes of the seed's stream while reading, and once it has read
// the client's FIN it sends the sha256 of everything it received and
// half-closes.
func Exchange(c *net.TCPConn) {
	var hdr [16]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	seed, n := binary.LittleEndian.Uint64(hdr[:8]), binary.LittleEndian.Uint64(hdr[8:])
	sendErr := make(chan error, 1)
	go func() {
		_, err := io.CopyN(struct{ io.Writer }{c}, NewStream(seed), int64(n))
		sendErr <- err
	}()
	h := sha256.New()
	_, rerr := io.Copy(h, struct{ io.Reader }{c})
	if err := <-sendErr; err != nil || rerr != nil {
		return
	}
	if _, err := c.Write(h.Sum(nil)); err != nil {
		return
	}
	_ = c.CloseWrite()
	// Wait for the client's close so our FIN is not raced by a RST.
	_, _ = io.Copy(io.Discard, c)
}

// ExchangeResult is what a client of Exchange observed.
type ExchangeResult struct {
	Sent, Received int64
}

// RunExchange sends up bytes (stream seed) and asks for down bytes (stream
// seed+1), then checks both directions byte-exact. readDelay slows the
// client's reading down (a slow receiver) when not zero.
func RunExchange(ctx context.Context, c *net.TCPConn, seed uint64, up, down int64, readChunk int, readDelay time.Duration) (ExchangeResult, error) {
	var res ExchangeResult
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	var hdr [16]byte
	binary.LittleEndian.PutUint64(hdr[:8], seed+1)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(down))
	wantUp := sha256.New()
	sendErr := make(chan error, 1)
	go func() {
		if _, err := c.Write(hdr[:]); err != nil {
			sendErr <- fmt.Errorf("write header: %w", err)
			return
		}
		n, err := io.CopyN(struct{ io.Writer }{c}, io.TeeReader(NewStream(seed), wantUp), up)
		res.Sent = n
		if err != nil {
			sendErr <- fmt.Errorf("send payload after %d of %d bytes: %w", n, up, err)
			return
		}
		sendErr <- c.CloseWrite()
	}()
	// Receive down bytes, compare with the expected stream as we go.
	want := NewStream(seed + 1)
	buf := make([]byte, max(readChunk, 1))
	exp := make([]byte, len(buf))
	for res.Received < down {
		chunk := buf[:min(int64(len(buf)), down-res.Received)]
		n, err := c.Read(chunk)
		if n > 0 {
			_, _ = io.ReadFull(want, exp[:n])
			for i := range n {
				if chunk[i] != exp[i] {
					return res, fmt.Errorf("byte %d of the reply differs: got %#x want %#x", res.Received+int64(i), chunk[i], exp[i])
				}
			}
			res.Received += int64(n)
		}
		if err != nil {
			return res, fmt.Errorf("read reply after %d of %d bytes: %w", res.Received, down, err)
		}
		if readDelay > 0 {
			time.Sleep(readDelay)
		}
	}
	if err := <-sendErr; err != nil {
		return res, err
	}
	sum := make([]byte, sha256.Size)
	if _, err := io.ReadFull(c, sum); err != nil {
		return res, fmt.Errorf("read server's sha256 of %d sent bytes: %w", up, err)
	}
	if got, wantSum := fmt.Sprintf("%x", sum), fmt.Sprintf("%x", wantUp.Sum(nil)); got != wantSum {
		return res, fmt.Errorf("server received different bytes: sha256 %s, sent %s", got, wantSum)
	}
	var extra [1]byte
	if n, err := c.Read(extra[:]); n != 0 || !errors.Is(err, io.EOF) {
		return res, fmt.Errorf("after the reply: read %d bytes, err %v; want EOF", n, err)
	}
	return res, nil
}
