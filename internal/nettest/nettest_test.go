//go:build linux

package nettest

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func exists(name string) bool {
	_, err := os.Stat("/run/netns/" + name)
	return err == nil
}

// TestCreateTopologyLeavesNothing: the error-returning form removes what it
// made when a step fails, and Delete removes the rest when it succeeds.
func TestCreateTopologyLeavesNothing(t *testing.T) {
	RequireRoot(t)
	names := TopologyNames{Client: "ept-tc-" + randomSuffix(), Proxy: "ept-tp-" + randomSuffix(), Backend: "ept-tb-" + randomSuffix()}
	addrs := TopologyAddrs{Client: "10.79.1.2/24", ProxyClient: "10.79.1.1/24", ProxyBackend: "10.79.2.1/24", Backend: "10.79.2.2/24"}

	bad := addrs
	bad.Backend = "not-an-address"
	if topo, err := CreateTopology(names, bad); err == nil {
		_ = topo.Delete()
		t.Fatal("CreateTopology with a bad backend address succeeded")
	} else if !strings.Contains(err.Error(), "not-an-address") {
		t.Errorf("error %q does not name the failing command", err)
	}
	for _, n := range []string{names.Client, names.Proxy, names.Backend} {
		if exists(n) {
			_, _ = Run("ip", "netns", "del", n)
			t.Errorf("namespace %s left behind by a failed CreateTopology", n)
		}
	}

	topo, err := CreateTopology(names, addrs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = topo.Delete() })
	var ln net.Listener
	if err := topo.Proxy.Do(func() (err error) { ln, err = net.Listen("tcp", "10.79.1.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := topo.Client.Do(func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		t.Errorf("client cannot reach the proxy over the veth: %v", err)
	}
	if err := topo.Delete(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{names.Client, names.Proxy, names.Backend} {
		if exists(n) {
			t.Errorf("namespace %s still there after Delete", n)
		}
	}
}
