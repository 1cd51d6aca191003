//go:build linux

// Package nettest builds throwaway network namespaces joined by veth for
// the privileged tests, and the small servers that run inside them. Every
// namespace, link and process it makes is removed through t.Cleanup, also
// when the test fails.
//
// Programs that are not tests (the benchmark driver) use the forms that
// return errors instead: CreateNS, Veth, Run and CreateTopology, each with
// a Delete that the caller runs. The test forms are built on them, so both
// set up the same way.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
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

// NewNS creates a namespace with loopback up, removed when the test ends.
func NewNS(t testing.TB, role string) *NS {
	t.Helper()
	ns, err := CreateNS("ept-" + role + "-" + randomSuffix())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ns.Delete() })
	return ns
}

// CreateNS creates the namespace /run/netns/name with loopback up. The
// caller removes it with Delete; on error nothing is left behind.
func CreateNS(name string) (*NS, error) {
	if _, err := Run("ip", "netns", "add", name); err != nil {
		return nil, err
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		_ = exec.Command("ip", "netns", "del", name).Run()
		return nil, fmt.Errorf("open namespace %s: %w", name, err)
	}
	ns := &NS{Name: name, handle: h}
	if _, err := Run("ip", "-n", name, "link", "set", "lo", "up"); err != nil {
		_ = ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete closes the namespace's handle and removes its name (with the
// veth ends in it). A process still inside keeps the namespace alive
// until it exits.
func (n *NS) Delete() error {
	n.handle.Close()
	_, err := Run("ip", "netns", "del", n.Name)
	return err
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
	out, err := Run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Run runs a command and returns its combined output; an error carries
// the command line and the output.
func Run(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Link joins a and b with a veth pair and gives each end an address in
// CIDR form (e.g. "10.77.1.1/24"); it returns the two interface names.
func Link(t testing.TB, a *NS, aAddr string, b *NS, bAddr string) (aDev, bDev string) {
	t.Helper()
	aDev, bDev, err := Veth(a, aAddr, b, bAddr)
	if err != nil {
		t.Fatal(err)
	}
	return aDev, bDev
}

// Veth is Link for programs that are not tests. On error the pair may be
// left behind; deleting either namespace removes it.
func Veth(a *NS, aAddr string, b *NS, bAddr string) (aDev, bDev string, err error) {
	suffix := randomSuffix()
	va, vb := "va"+suffix, "vb"+suffix
	for _, argv := range [][]string{
		{"ip", "link", "add", va, "netns", a.Name, "type", "veth", "peer", "name", vb, "netns", b.Name},
		{"ip", "-n", a.Name, "addr", "add", aAddr, "dev", va},
		{"ip", "-n", b.Name, "addr", "add", bAddr, "dev", vb},
		{"ip", "-n", a.Name, "link", "set", va, "up"},
		{"ip", "-n", b.Name, "link", "set", vb, "up"},
	} {
		if _, err := Run(argv[0], argv[1:]...); err != nil {
			return "", "", err
		}
	}
	return va, vb, nil
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

// NewTopology builds client <-> proxy <-> backend with the fixed
// addresses above, removed when the test ends.
func NewTopology(t testing.TB) *Topology {
	t.Helper()
	topo, err := CreateTopology(
		TopologyNames{Client: "ept-cli-" + randomSuffix(), Proxy: "ept-prx-" + randomSuffix(), Backend: "ept-bak-" + randomSuffix()},
		TopologyAddrs{Client: ClientIP + "/24", ProxyClient: ProxyClientIP + "/24", ProxyBackend: ProxyBackendIP + "/24", Backend: BackendIP + "/24"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = topo.Delete() })
	return topo
}

// TopologyNames are the names of a topology's three namespaces.
type TopologyNames struct{ Client, Proxy, Backend string }

// TopologyAddrs are the addresses, in CIDR form, of the four veth ends: the
// client's, the proxy's on the client link, the proxy's on the backend
// link and the backend's.
type TopologyAddrs struct{ Client, ProxyClient, ProxyBackend, Backend string }

// CreateTopology is NewTopology for programs that are not tests, with
// names and addresses of the caller's choosing. The caller removes it with
// Delete; on error nothing is left behind.
func CreateTopology(names TopologyNames, addrs TopologyAddrs) (topo *Topology, err error) {
	topo = &Topology{}
	defer func() {
		if err != nil {
			_ = topo.Delete()
			topo = nil
		}
	}()
	if topo.Client, err = CreateNS(names.Client); err != nil {
		return topo, err
	}
	if topo.Proxy, err = CreateNS(names.Proxy); err != nil {
		return topo, err
	}
	if topo.Backend, err = CreateNS(names.Backend); err != nil {
		return topo, err
	}
	if topo.ClientDev, topo.ProxyClientDev, err = Veth(topo.Client, addrs.Client, topo.Proxy, addrs.ProxyClient); err != nil {
		return topo, err
	}
	topo.ProxyBackendDev, topo.BackendDev, err = Veth(topo.Proxy, addrs.ProxyBackend, topo.Backend, addrs.Backend)
	return topo, err
}

// Delete removes the namespaces the topology has, backend first, and
// returns every failure.
func (topo *Topology) Delete() error {
	var errs []error
	for _, ns := range []*NS{topo.Backend, topo.Proxy, topo.Client} {
		if ns != nil {
			errs = append(errs, ns.Delete())
		}
	}
	return errors.Join(errs...)
}
