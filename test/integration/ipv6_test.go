//go:build linux

package integration

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// IPv6 end to end: the proxy listens dual-stack on [::]:8080, an IPv6
// client reaches an IPv6 backend, and an IPv4 client arriving as
// ::ffff:a.b.c.d is routed by its IPv4 address's country.
func TestIPv6ClientsAndBackends(t *testing.T) {
	nettest.RequireRoot(t)
	const (
		// Clients in public space (ULA and private space resolve to no
		// country), reachable only inside the test's namespaces.
		clientV6  = "2600:77:1::2"
		proxyV6   = "2600:77:1::1"
		clientV4  = "11.77.1.2"
		proxyV4   = "11.77.1.1"
		proxyBV6  = "fd77:2::1"
		backendV6 = "fd77:2::2"
	)
	writer, err := mmdbwriter.New(mmdbwriter.Options{DatabaseType: "GeoLite2-Country", RecordSize: 24, IncludeReservedNetworks: true})
	if err != nil {
		t.Fatal(err)
	}
	for cidr, cc := range map[string]string{"11.77.1.0/24": "FR", "2600:77:1::/64": "BR"} {
		_, n, _ := net.ParseCIDR(cidr)
		if err := writer.Insert(n, mmdbtype.Map{"country": mmdbtype.Map{"iso_code": mmdbtype.String(cc)}}); err != nil {
			t.Fatal(err)
		}
	}
	geo := filepath.Join(t.TempDir(), "v6.mmdb")
	f, err := os.Create(geo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writer.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()

	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.AddAddr(t, topo.Client, topo.ClientDev, clientV6+"/64")
			nettest.AddAddr(t, topo.Client, topo.ClientDev, clientV4+"/24")
			nettest.AddAddr(t, topo.Proxy, topo.ProxyClientDev, proxyV4+"/24")
			nettest.AddAddr(t, topo.Proxy, topo.ProxyClientDev, proxyV6+"/64")
			nettest.AddAddr(t, topo.Proxy, topo.ProxyBackendDev, proxyBV6+"/64")
			nettest.AddAddr(t, topo.Backend, topo.BackendDev, backendV6+"/64")
			nettest.Serve(t, topo.Backend, "["+backendV6+"]:9000", nettest.Greeter("br-v6"))
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9001", nettest.Greeter("fr-v4"))
			p := startProxy(t, topo.Proxy, plane, []backendRow{
				{ID: "br-v6", Region: "sa", Country: "BR", Addr: backendV6, Port: 9000, Healthy: true, Weight: 1, Soft: 100},
				{ID: "fr-v4", Region: "eu", Country: "FR", Addr: nettest.BackendIP, Port: 9001, Healthy: true, Weight: 1, Soft: 100},
			}, "EDGEPROXY_LISTEN_ADDR=[::]:8080", "EDGEPROXY_GEOIP_PATH="+geo, "EDGEPROXY_REGION=us")
			if !strings.Contains(p.logs.String(), "listen=[::]:8080") {
				t.Fatalf("not listening on [::]:8080:\n%s", p.logs.String())
			}
			// IPv6 client, BR by the geo database: the IPv6 backend.
			nettest.MustReach(t, topo.Client, "["+proxyV6+"]:8080", "br-v6")
			// IPv4 client through the dual-stack socket: FR, not unknown.
			nettest.MustReach(t, topo.Client, proxyV4+":8080", "fr-v4")
			// Byte-exact both ways over IPv6.
			c, err := nettest.Dial(topo.Client, "["+proxyV6+"]:8080", 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := nettest.ReadLine(c, 2*time.Second); err != nil {
				t.Fatal(err)
			}
			payload := strings.Repeat("ipv6 all the way ", 5000)
			go c.Write([]byte(payload + "\n"))
			if got, err := nettest.ReadLine(c, 5*time.Second); err != nil || got != payload {
				t.Fatalf("echo over IPv6: %d bytes, %v; want %d", len(got), err, len(payload))
			}
			c.Close()
			p.waitNoEntries(t)
		})
	}
}

// A backend at an IPv6 link-local address is reachable only through the
// interface its zone names: the row says fe80::…%dev, and both data planes
// dial through that interface.
func TestLinkLocalBackendWithZone(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			linkLocal := usableLinkLocal(t, topo.Backend, topo.BackendDev)
			// The proxy's end needs its own link-local address out of
			// duplicate address detection before it can dial from it.
			usableLinkLocal(t, topo.Proxy, topo.ProxyBackendDev)
			nettest.Serve(t, topo.Backend, "[::]:9000", nettest.Greeter("ll"))
			row := backendAt("ll", 9000)
			row.Addr = linkLocal + "%" + topo.ProxyBackendDev
			p := startProxy(t, topo.Proxy, plane, []backendRow{row})
			if strings.Contains(p.logs.String(), "routing row skipped") {
				t.Fatalf("the link-local row was skipped:\n%s", p.logs.String())
			}
			nettest.MustReach(t, topo.Client, proxyAddr, "ll")
		})
	}
}

// usableLinkLocal waits until dev in ns has a link-local address that
// duplicate address detection no longer holds tentative, and returns it.
func usableLinkLocal(t *testing.T, ns *nettest.NS, dev string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := ns.Command("ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link", "-tentative").CombinedOutput()
		if err != nil {
			t.Fatalf("link-local address of %s: %v: %s", dev, err, out)
		}
		for _, f := range strings.Fields(string(out)) {
			if strings.HasPrefix(f, "fe80:") {
				return strings.SplitN(f, "/", 2)[0]
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no usable link-local address on %s after 5s: %s", dev, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
