//go:build linux

package integration

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

func waitExit(t *testing.T, p *proxyProc, within time.Duration) error {
	t.Helper()
	select {
	case err := <-p.done:
		p.cmd = nil
		return err
	case <-time.After(within):
		t.Fatalf("edgeproxy still running %s after the signal", within)
		return nil
	}
}

func TestDrainOnSIGTERM(t *testing.T) {
	nettest.RequireRoot(t)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
			p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_DRAIN_SECS=10")
			held, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Close()
			if l, err := nettest.ReadLine(held, 2*time.Second); err != nil || l != "hello from b1" {
				t.Fatalf("greeting %q %v", l, err)
			}
			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			// Not accepting any more.
			if c, err := nettest.Dial(topo.Client, proxyAddr, time.Second); err == nil {
				c.Close()
				t.Fatal("a new connection was accepted while draining")
			} else if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("new connection while draining: %v, want refused", err)
			}
			// The established one still works both ways.
			fmt.Fprintln(held, "still here")
			if l, err := nettest.ReadLine(held, 2*time.Second); err != nil || l != "still here" {
				t.Fatalf("held connection during drain: %q %v", l, err)
			}
			start := time.Now()
			held.Close()
			if err := waitExit(t, p, 3*time.Second); err != nil {
				t.Fatalf("edgeproxy exited with %v after its last connection closed", err)
			}
			t.Logf("exited %s after the last connection closed", time.Since(start))
			if plane == "sockmap" {
				for _, m := range []string{"sockets", "pairings", "flows", "backends", "verdicts", "backend_bytes"} {
					if _, err := os.Stat(p.PinPath + "/" + m); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("pinned %s outlived the process (stat: %v)", m, err)
					}
				}
				if _, err := os.Stat(p.PinPath + "/affinity"); err != nil {
					t.Errorf("the affinity map must stay pinned for the next process: %v", err)
				}
			}
			if !strings.Contains(p.logs.String(), "draining") {
				t.Errorf("no drain line in the log:\n%s", p.logs.String())
			}
		})
	}
}

func TestSecondSIGTERMEndsDrain(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_DRAIN_SECS=30")
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	held, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	nettest.ReadLine(held, 2*time.Second)
	p.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(200 * time.Millisecond)
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := waitExit(t, p, 2*time.Second); err != nil {
		t.Fatalf("exit: %v", err)
	}
	_ = held.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := held.Read(make([]byte, 8)); err == nil || isTimeout(err) {
		t.Fatalf("held connection after the second SIGTERM: %v, want it closed", err)
	}
}

func TestDrainTimeoutClosesTheRest(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	p := startProxy(t, topo.Proxy, "splice", []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_DRAIN_SECS=1")
	held, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	nettest.ReadLine(held, 2*time.Second)
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGINT)
	if err := waitExit(t, p, 4*time.Second); err != nil {
		t.Fatalf("exit: %v", err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("exited after %s, before the 1s drain was over", d)
	}
	if !strings.Contains(p.logs.String(), "drain time over") {
		t.Errorf("no drain-over line:\n%s", p.logs.String())
	}
}

func TestSIGHUPReloadsAtOnce(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("b2"))
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)})
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	writeDB(t, p.DBPath, []backendRow{backendAt("b2", 9001)})
	p.cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(time.Second)
	for !strings.Contains(p.logs.String(), "geo database reloaded on SIGHUP") {
		if time.Now().After(deadline) {
			t.Fatalf("no SIGHUP reload in the log:\n%s", p.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	nettest.MustReach(t, topo.Client, proxyAddr, "b2")
}
