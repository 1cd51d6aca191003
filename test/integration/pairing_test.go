//go:build linux

package integration

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// TestSockmapPairsMessagesNotStreams: on the sockmap plane a connection
// exchanging messages is paired into the sockhash once it is 20 ms old,
// while a bulk stream beside it stays spliced through a pipe and is never
// paired. Both stay byte-exact, and the stream is looked at long after it
// could have been paired.
func TestSockmapPairsMessagesNotStreams(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", func(c *net.TCPConn) {
		var kind [1]byte
		if _, err := io.ReadFull(c, kind[:]); err != nil {
			return
		}
		switch kind[0] {
		case 'x':
			nettest.Exchange(c)
		case 'e':
			nettest.Echo(c)
		}
	})
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")

	messages, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer messages.Close()
	if _, err := messages.Write([]byte{'e'}); err != nil {
		t.Fatal(err)
	}
	exchangeMessages(t, []*net.TCPConn{messages}, 60*time.Millisecond)
	if s, pr := p.mapEntries(t); s != 2 || pr != 2 {
		t.Fatalf("after 60 ms of messages: %d sockhash entries and %d pairings, want 2 each (the connection paired)", s, pr)
	}

	stream, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if _, err := stream.Write([]byte{'x'}); err != nil {
		t.Fatal(err)
	}
	const each = 256 << 20
	ctx := withTimeout(t, 60*time.Second)
	type exchanged struct {
		res nettest.ExchangeResult
		err error
	}
	done := make(chan exchanged, 1)
	started := time.Now()
	go func() {
		res, err := nettest.RunExchange(ctx, stream, 11, each, each, 64<<10, 0)
		done <- exchanged{res, err}
	}()

	// Until the stream ends, keep exchanging messages on the other
	// connection and count the sockhash: only its two sockets are there.
	var looks, lateLooks int
	var end exchanged
	for running := true; running; {
		select {
		case end = <-done:
			running = false
			continue
		default:
		}
		exchangeMessages(t, []*net.TCPConn{messages}, 5*time.Millisecond)
		s, pr := p.mapEntries(t)
		if s != 2 || pr != 2 {
			t.Fatalf("%s into the stream: %d sockhash entries and %d pairings, want 2 each (the stream not paired)",
				time.Since(started).Round(time.Millisecond), s, pr)
		}
		looks++
		if time.Since(started) > 100*time.Millisecond {
			lateLooks++
		}
		time.Sleep(10 * time.Millisecond)
	}
	if end.err != nil {
		t.Fatalf("stream after %d bytes up and %d down: %v", end.res.Sent, end.res.Received, end.err)
	}
	if end.res.Sent != each || end.res.Received != each {
		t.Fatalf("stream moved %d bytes up and %d down, want %d each", end.res.Sent, end.res.Received, each)
	}
	t.Logf("a 256 MiB stream each way took %s; the sockhash was counted %d times, %d of them 100 ms or more into it",
		time.Since(started).Round(time.Millisecond), looks, lateLooks)
	if lateLooks < 3 {
		t.Fatalf("the stream ended before it was looked at 100 ms in (%d looks in all): the test proves nothing", looks)
	}

	// The message connection still answers byte-exact after the stream.
	msg, back := bytes.Repeat([]byte("z"), 64), make([]byte, 64)
	if _, err := messages.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(messages, back); err != nil || !bytes.Equal(msg, back) {
		t.Fatalf("echo after the stream: %q, %v", back, err)
	}
}
