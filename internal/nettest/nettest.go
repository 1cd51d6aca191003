//go:build linux

// Package nettest builds throwaway network namespaces joined by veth for
// the privileged tests, and the small servers that run inside them. Every
// namespace, link and process it makes is removed through t.Cleanup, also
// when the test fails.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
)

// RequireRoot skips off Linux or without root, saying why. Where it passes,
// the privileged tests must run: a missing kernel feature is a failure.
func RequireRoot(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skipf("privileged test needs Linux, this is %s", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		t.Skip("privileged test needs root (network namespaces, BPF); run: sudo make test")
	}
}

// NS is a named network namespace under /run/netns.
type NS struct {
	Name   string
	handle netns.NsHandle
}

func randomSuffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NewNS creates a namespace with loopback up.
func NewNS(t testing.TB, role string) *NS {
	t.Helper()
	name := "ept-" + role + "-" + randomSuffix()
	MustRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open namespace %s: %v", name, err)
	}
	t.Cleanup(func() { h.Close() })
	ns := &NS{Name: name, handle: h}
	MustRun(t, "ip", "-n", name, "link", "set", "lo", "up")
	return ns
}

// Do runs f on a thread switched into the namespace. Sockets f creates
// belong to the namespace and stay usable from any goroutine afterwards.
func (n *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is not unlocked: if switching back failed, it must
		// die with the goroutine rather than serve others in the wrong
		// namespace.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(n.handle); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", n.Name, err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leave namespace %s: %w", n.Name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Command runs a program with only its network namespace switched, so it
// shares the test's mounts (bpffs pins stay visible).
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.Name, "--", name}, args...)...)
}

// MustRun runs a command and fails the test with its output on error.
func MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Link joins a and b with a veth pair and gives each end an address in
// CIDR form (e.g. "10.77.1.1/24"); it returns the two interface names.
func Link(t testing.TB, a *NS, aAddr string, b *NS, bAddr string) (aDev, bDev string) {
	t.Helper()
	suffix := randomSuffix()
	va, vb := "va"+suffix, "vb"+suffix
	MustRun(t, "ip", "link", "add", va, "netns", a.Name, "type", "veth", "peer", "name", vb, "netns", b.Name)
	MustRun(t, "ip", "-n", a.Name, "addr", "add", aAddr, "dev", va)
	MustRun(t, "ip", "-n", b.Name, "addr", "add", bAddr, "dev", vb)
	MustRun(t, "ip", "-n", a.Name, "link", "set", va, "up")
	MustRun(t, "ip", "-n", b.Name, "link", "set", vb, "up")
	return va, vb
}

// AddAddr adds another address to an interface; IPv6 ones skip duplicate
// address detection so they work at once.
func AddAddr(t testing.TB, ns *NS, dev, cidr string) {
	t.Helper()
	args := []string{"-n", ns.Name, "addr", "add", cidr, "dev", dev}
	if strings.Contains(cidr, ":") {
		args = append(args, "nodad")
	}
	MustRun(t, "ip", args...)
}

// Topology is the client, proxy and backend hosts of one test: the proxy
// sits between two veth links and forwards nothing at the IP layer, so a
// client can only reach a backend through edgeproxy.
type Topology struct {
	Client, Proxy, Backend *NS
	// Interface names: client side and proxy side of the client link, proxy
	// side and backend side of the backend link.
	ClientDev, ProxyClientDev, ProxyBackendDev, BackendDev string
}

// Fixed addresses: each topology's namespaces are private, so every test
// can use the same ones.
const (
	ClientIP       = "10.77.1.2"
	ProxyClientIP  = "10.77.1.1"
	ProxyBackendIP = "10.77.2.1"
	BackendIP      = "10.77.2.2"
)

// NewTopology builds client <-> proxy <-> backend.
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	topo := &Topology{Client: NewNS(t, "cli"), Proxy: NewNS(t, "prx"), Backend: NewNS(t, "bak")}
	topo.ClientDev, topo.ProxyClientDev = Link(t, topo.Client, ClientIP+"/24", topo.Proxy, ProxyClientIP+"/24")
	topo.ProxyBackendDev, topo.BackendDev = Link(t, topo.Proxy, ProxyBackendIP+"/24", topo.Backend, BackendIP+"/24")
	return topo
}
