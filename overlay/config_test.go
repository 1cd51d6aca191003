package overlay

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func mustPop(t *testing.T, id string, n byte, endpoint, wgIP, allowed string) Pop {
	t.Helper()
	p, err := ParsePopRow(id, "sa", testKey(n).String(), endpoint, wgIP, allowed)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// literalOnly resolves IP literals and fails names, as a network-less test
// wants.
func literalOnly(hostport string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return netip.AddrPort{}, errors.New("no such host")
	}
	return ap, nil
}

func TestDesiredConfig(t *testing.T) {
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	s := Settings{Interface: "wg-edge", ListenPort: 51820, Address: netip.MustParsePrefix("10.50.1.1/16"), PopID: "pop-a"}
	pops := []Pop{
		mustPop(t, "pop-a", 1, "192.0.2.1:51820", "10.50.1.1", "10.50.1.1/32"),
		mustPop(t, "pop-b", 2, "192.0.2.2:51820", "10.50.2.1", "10.50.2.1/32,10.60.2.0/24"),
		mustPop(t, "pop-c", 3, "", "10.50.3.1", "10.50.3.1/32"),
		mustPop(t, "pop-d", 4, "edge-d.example.net:51820", "10.50.4.1", "10.50.4.1/32"),
	}
	cfg, errs := DesiredConfig(s, priv, pops, literalOnly)

	if cfg.ReplacePeers {
		t.Error("ReplacePeers is true: applying it would drop every session")
	}
	if cfg.PrivateKey == nil || *cfg.PrivateKey != priv || cfg.ListenPort == nil || *cfg.ListenPort != 51820 {
		t.Errorf("key/port = %v/%v, want this POP's", cfg.PrivateKey, cfg.ListenPort)
	}
	var keys []wgtypes.Key
	for _, p := range cfg.Peers {
		keys = append(keys, p.PublicKey)
		// pop-c dials in: no keepalive towards a peer with no endpoint.
		want := 25 * time.Second
		if p.PublicKey == testKey(3) {
			want = 0
		}
		if p.PersistentKeepaliveInterval == nil || *p.PersistentKeepaliveInterval != want {
			t.Errorf("peer %s keepalive = %v, want %v", p.PublicKey, p.PersistentKeepaliveInterval, want)
		}
		if !p.ReplaceAllowedIPs || p.Remove || p.UpdateOnly {
			t.Errorf("peer %s flags: %+v", p.PublicKey, p)
		}
	}
	if want := []wgtypes.Key{testKey(2), testKey(3), testKey(4)}; !slices.Equal(keys, want) {
		t.Fatalf("peers %v, want pop-b, pop-c, pop-d (pop-a is this POP)", keys)
	}
	b := cfg.Peers[0]
	if b.Endpoint.String() != "192.0.2.2:51820" {
		t.Errorf("pop-b endpoint = %v", b.Endpoint)
	}
	if got := prefixesString(b.AllowedIPs); got != "10.50.2.1/32,10.60.2.0/24" {
		t.Errorf("pop-b allowed IPs = %s", got)
	}
	if cfg.Peers[1].Endpoint != nil {
		t.Errorf("pop-c dials in: endpoint = %v, want none", cfg.Peers[1].Endpoint)
	}
	// The name that does not resolve: reported, peer kept without an
	// endpoint so an existing one is left alone.
	if cfg.Peers[2].Endpoint != nil || len(errs) != 1 || !strings.Contains(errs[0].Error(), `pops row "pop-d"`) {
		t.Errorf("pop-d: endpoint %v, errors %v; want none and one error naming pop-d", cfg.Peers[2].Endpoint, errs)
	}
}

func TestDesiredConfigRefusesWhatCannotBeAPeer(t *testing.T) {
	priv, _ := wgtypes.GeneratePrivateKey()
	self, err := ParsePopRow("my-host-name", "sa", priv.PublicKey().String(), "", "10.50.1.1", "10.50.1.1/32")
	if err != nil {
		t.Fatal(err)
	}
	s := Settings{Interface: "wg-edge", Address: netip.MustParsePrefix("10.50.1.1/16"), PopID: "pop-a"}
	pops := []Pop{
		self,
		mustPop(t, "loop", 2, "10.60.2.7:51820", "10.50.2.1", "10.50.2.1/32,10.60.2.0/24"),
	}
	cfg, errs := DesiredConfig(s, priv, pops, literalOnly)
	if len(cfg.Peers) != 0 {
		t.Fatalf("peers %v, want none", cfg.Peers)
	}
	all := errors.Join(errs...).Error()
	for _, w := range []string{
		`pops row "my-host-name": wg_public_key is this POP's own key, but this POP's id is "pop-a": set EDGEPROXY_POP_ID=my-host-name`,
		`pops row "loop": endpoint 10.60.2.7:51820 (10.60.2.7) lies inside the overlay's allowed IPs`,
	} {
		if !strings.Contains(all, w) {
			t.Errorf("errors %q lack %q", all, w)
		}
	}
}

func ipn(s ...string) []net.IPNet {
	var out []net.IPNet
	for _, x := range s {
		out = append(out, ipNet(netip.MustParsePrefix(x)))
	}
	return out
}

func udp(s string) *net.UDPAddr { return net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s)) }

func keepalive(d time.Duration) *time.Duration { return &d }

func TestDiffPeers(t *testing.T) {
	ka := keepalive(PersistentKeepalive)
	desiredPeer := func(n byte, ep string, allowed ...string) wgtypes.PeerConfig {
		p := wgtypes.PeerConfig{PublicKey: testKey(n), PersistentKeepaliveInterval: ka, ReplaceAllowedIPs: true, AllowedIPs: ipn(allowed...)}
		if ep != "" {
			p.Endpoint = udp(ep)
		}
		return p
	}
	currentPeer := func(n byte, ep string, allowed ...string) wgtypes.Peer {
		p := wgtypes.Peer{PublicKey: testKey(n), PersistentKeepaliveInterval: PersistentKeepalive, AllowedIPs: ipn(allowed...),
			LastHandshakeTime: time.Unix(1700000000, 0), ReceiveBytes: 1234}
		if ep != "" {
			p.Endpoint = udp(ep)
		}
		return p
	}
	cases := []struct {
		name       string
		current    []wgtypes.Peer
		desired    []wgtypes.PeerConfig
		configured map[wgtypes.Key]netip.AddrPort
		want       Plan
	}{
		{
			name:    "empty device gets every peer",
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			want:    Plan{Add: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")}},
		},
		{
			name:    "unchanged peers are untouched",
			current: []wgtypes.Peer{currentPeer(1, "192.0.2.1:51820", "10.60.1.0/24", "10.50.1.1/32")},
			// Same set in another order: no change.
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32", "10.60.1.0/24")},
		},
		{
			name:    "a peer no row names is removed",
			current: []wgtypes.Peer{currentPeer(1, "192.0.2.1:51820", "10.50.1.1/32"), currentPeer(2, "192.0.2.2:51820", "10.50.2.1/32")},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			want:    Plan{Remove: []wgtypes.Key{testKey(2)}},
		},
		{
			name:    "changed allowed IPs update only them",
			current: []wgtypes.Peer{currentPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32", "10.60.1.0/24")},
			want: Plan{Update: []wgtypes.PeerConfig{{PublicKey: testKey(1), UpdateOnly: true, ReplaceAllowedIPs: true,
				AllowedIPs: ipn("10.50.1.1/32", "10.60.1.0/24")}}},
		},
		{
			name:    "changed endpoint updates only it",
			current: []wgtypes.Peer{currentPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.99:51820", "10.50.1.1/32")},
			want:    Plan{Update: []wgtypes.PeerConfig{{PublicKey: testKey(1), UpdateOnly: true, Endpoint: udp("192.0.2.99:51820")}}},
		},
		{
			name:       "a roamed endpoint is left alone",
			current:    []wgtypes.Peer{currentPeer(1, "198.51.100.7:40000", "10.50.1.1/32")},
			desired:    []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			configured: map[wgtypes.Key]netip.AddrPort{testKey(1): netip.MustParseAddrPort("192.0.2.1:51820")},
		},
		{
			name:       "a new endpoint in the table wins over roaming",
			current:    []wgtypes.Peer{currentPeer(1, "198.51.100.7:40000", "10.50.1.1/32")},
			desired:    []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.2:51820", "10.50.1.1/32")},
			configured: map[wgtypes.Key]netip.AddrPort{testKey(1): netip.MustParseAddrPort("192.0.2.1:51820")},
			want:       Plan{Update: []wgtypes.PeerConfig{{PublicKey: testKey(1), UpdateOnly: true, Endpoint: udp("192.0.2.2:51820")}}},
		},
		{
			name:    "no endpoint in the table keeps the learned one",
			current: []wgtypes.Peer{currentPeer(1, "198.51.100.7:40000", "10.50.1.1/32")},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "", "10.50.1.1/32")},
		},
		{
			name: "a keepalive set by hand is restored",
			current: []wgtypes.Peer{func() wgtypes.Peer {
				p := currentPeer(1, "192.0.2.1:51820", "10.50.1.1/32")
				p.PersistentKeepaliveInterval = 0
				return p
			}()},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
			want:    Plan{Update: []wgtypes.PeerConfig{{PublicKey: testKey(1), UpdateOnly: true, PersistentKeepaliveInterval: ka}}},
		},
		{
			name:    "an IPv4-mapped endpoint equals the plain one",
			current: []wgtypes.Peer{currentPeer(1, "[::ffff:192.0.2.1]:51820", "10.50.1.1/32")},
			desired: []wgtypes.PeerConfig{desiredPeer(1, "192.0.2.1:51820", "10.50.1.1/32")},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := DiffPeers(c.current, c.desired, c.configured)
			if !samePlan(got, c.want) {
				t.Fatalf("plan:\n got %s\nwant %s", planString(got), planString(c.want))
			}
		})
	}
}

func TestPlanConfigRemovesFirst(t *testing.T) {
	p := Plan{
		Add:    []wgtypes.PeerConfig{{PublicKey: testKey(3)}},
		Update: []wgtypes.PeerConfig{{PublicKey: testKey(2), UpdateOnly: true}},
		Remove: []wgtypes.Key{testKey(1)},
	}
	cfg := p.Config()
	if cfg.ReplacePeers || cfg.PrivateKey != nil || cfg.ListenPort != nil {
		t.Fatalf("config touches more than peers: %+v", cfg)
	}
	if len(cfg.Peers) != 3 || !cfg.Peers[0].Remove || cfg.Peers[0].PublicKey != testKey(1) || cfg.Peers[1].PublicKey != testKey(3) {
		t.Fatalf("peers %+v: want the removal first, then the addition, then the update", cfg.Peers)
	}
	if (Plan{}).Empty() != true || p.Empty() {
		t.Fatal("Empty is wrong")
	}
}

func samePlan(a, b Plan) bool {
	return planString(a) == planString(b)
}

func planString(p Plan) string {
	var sb strings.Builder
	pc := func(c wgtypes.PeerConfig) {
		sb.WriteString(c.PublicKey.String()[:4])
		if c.UpdateOnly {
			sb.WriteString(" update-only")
		}
		if c.Endpoint != nil {
			sb.WriteString(" endpoint=" + c.Endpoint.String())
		}
		if c.ReplaceAllowedIPs {
			sb.WriteString(" allowed=" + prefixesString(c.AllowedIPs))
		}
		if c.PersistentKeepaliveInterval != nil {
			sb.WriteString(" keepalive=" + c.PersistentKeepaliveInterval.String())
		}
		sb.WriteString("; ")
	}
	sb.WriteString("add[")
	for _, c := range p.Add {
		pc(c)
	}
	sb.WriteString("] update[")
	for _, c := range p.Update {
		pc(c)
	}
	sb.WriteString("] remove[")
	for _, k := range p.Remove {
		sb.WriteString(k.String()[:4] + "; ")
	}
	sb.WriteString("]")
	return sb.String()
}

func TestSettingsValidate(t *testing.T) {
	ok := Settings{Interface: "wg-edge", PrivateKeyFile: "/k", ListenPort: 51820, Address: netip.MustParsePrefix("10.50.1.1/16"), PopID: "a"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := []func(*Settings){
		func(s *Settings) { s.Interface = "" },
		func(s *Settings) { s.Interface = "much-too-long-name" },
		func(s *Settings) { s.Interface = "../../etc" },
		func(s *Settings) { s.PrivateKeyFile = "" },
		func(s *Settings) { s.ListenPort = 65536 },
		func(s *Settings) { s.Address = netip.Prefix{} },
	}
	for i, f := range bad {
		s := ok
		f(&s)
		if err := s.Validate(); err == nil {
			t.Errorf("case %d: %+v validated", i, s)
		}
	}
}

func TestResolveEndpointLiterals(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1:51820":            "192.0.2.1:51820",
		"[::ffff:192.0.2.1]:51820":   "192.0.2.1:51820",
		"[2001:db8::1]:51820":        "[2001:db8::1]:51820",
		"localhost:51820":            "127.0.0.1:51820",
		"localhost:not-a-known-port": "",
	} {
		got, err := ResolveEndpoint(in)
		if want == "" {
			if err == nil {
				t.Errorf("%s: resolved to %s, want an error", in, got)
			}
			continue
		}
		if err != nil || got.String() != want {
			t.Errorf("%s: got %s, %v; want %s", in, got, err, want)
		}
	}
}
