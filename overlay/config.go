package overlay

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// PersistentKeepalive is sent to every peer with an endpoint. It keeps NAT
// and stateful firewall mappings open, so this POP stays reachable from the
// other side, and it makes a fresh peer handshake at once instead of at the
// first packet a client is waiting on. A peer without an endpoint (it dials
// in) gets none: nothing can be sent to it before it writes first, and it is
// its own keepalive, towards our endpoint, that keeps its path open.
const PersistentKeepalive = 25 * time.Second

// Settings are this POP's own overlay settings (EDGEPROXY_WG_*,
// EDGEPROXY_POP_ID); the peers come from the pops table.
type Settings struct {
	// Interface is the WireGuard interface's name, e.g. wg-edge.
	Interface string
	// PrivateKeyFile holds this POP's private key, base64, as written by
	// `edgeproxy wg keygen`.
	PrivateKeyFile string
	// ListenPort is the UDP port peers reach this POP on; 0 picks one.
	ListenPort int
	// Address is this POP's overlay address with the overlay's prefix
	// length, e.g. 10.50.1.1/16.
	Address netip.Prefix
	// PopID is this POP's id in the pops table; that row is not a peer.
	PopID string
}

// Validate checks what can be checked without touching the system.
func (s Settings) Validate() error {
	if err := checkInterfaceName(s.Interface); err != nil {
		return err
	}
	if s.PrivateKeyFile == "" {
		return fmt.Errorf("wireguard interface %s: no private key file", s.Interface)
	}
	if s.ListenPort < 0 || s.ListenPort > 65535 {
		return fmt.Errorf("wireguard interface %s: listen port %d: want 0-65535", s.Interface, s.ListenPort)
	}
	if !s.Address.IsValid() {
		return fmt.Errorf("wireguard interface %s: no overlay address", s.Interface)
	}
	return nil
}

// checkInterfaceName applies the kernel's rules (dev_valid_name): 1-15
// bytes, not "." or "..", no '/', ':' or white space. The name is also part
// of the UAPI socket's path, so '/' would escape /var/run/wireguard.
func checkInterfaceName(name string) error {
	if name == "" || len(name) > 15 || name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n") {
		return fmt.Errorf("wireguard interface name %q: want 1-15 characters, no '/', ':' or spaces", name)
	}
	return nil
}

// Resolver turns an endpoint "host:port" into an address. IP literals must
// not need the network.
type Resolver func(hostport string) (netip.AddrPort, error)

// resolveTimeout bounds a host name lookup, so a slow DNS server delays a
// reconcile by seconds, not minutes.
const resolveTimeout = 3 * time.Second

// ResolveEndpoint is the Resolver the mesh uses: IP literals as they are,
// host names through the system resolver (first address, IPv4 preferred,
// as wg(8) does).
func ResolveEndpoint(hostport string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(hostport); err == nil {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("endpoint %q: %w", hostport, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), resolveTimeout)
	defer cancel()
	pn, err := net.DefaultResolver.LookupPort(ctx, "udp", port)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("endpoint %q: port: %w", hostport, err)
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("endpoint %q: resolve: %w", hostport, err)
	}
	if len(addrs) == 0 {
		return netip.AddrPort{}, fmt.Errorf("endpoint %q: resolve: no address", hostport)
	}
	best := addrs[0]
	for _, a := range addrs {
		if a.Unmap().Is4() {
			best = a
			break
		}
	}
	return netip.AddrPortFrom(best.Unmap(), uint16(pn)), nil
}

// DesiredConfig is the whole configuration the device should have: this
// POP's key and port, and one peer per pop except this POP's own row
// (id == s.PopID), each with its endpoint, allowed IPs and, when it has an
// endpoint, PersistentKeepalive. ReplacePeers is false: the config is a goal to diff
// against (DiffPeers), not something to apply wholesale, because replacing
// every peer would drop every live session.
//
// A pop that cannot be a peer is left out and reported: a row carrying this
// POP's own public key (usually EDGEPROXY_POP_ID not matching its row), or
// an endpoint inside some peer's allowed IPs (its UDP packets would be
// routed into the tunnel they carry). An endpoint that does not resolve is
// reported and its peer kept with no endpoint, which DiffPeers reads as
// "leave the current endpoint alone": a DNS hiccup must not cut a working
// peer.
func DesiredConfig(s Settings, privateKey wgtypes.Key, pops []Pop, resolve Resolver) (wgtypes.Config, []error) {
	port := s.ListenPort
	cfg := wgtypes.Config{PrivateKey: &privateKey, ListenPort: &port, ReplacePeers: false}
	self := privateKey.PublicKey()
	var errs []error
	var routed []netip.Prefix
	for _, p := range pops {
		if p.ID != s.PopID {
			routed = append(routed, p.AllowedIPs...)
		}
	}
	for _, p := range pops {
		if p.ID == s.PopID {
			continue
		}
		if wgtypes.Key(p.PublicKey) == self {
			errs = append(errs, fmt.Errorf("pops row %q: wg_public_key is this POP's own key, but this POP's id is %q: set EDGEPROXY_POP_ID=%s", p.ID, s.PopID, p.ID))
			continue
		}
		keepalive := time.Duration(0)
		if p.Endpoint != "" {
			keepalive = PersistentKeepalive
		}
		pc := wgtypes.PeerConfig{
			PublicKey:                   wgtypes.Key(p.PublicKey),
			PersistentKeepaliveInterval: &keepalive,
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  make([]net.IPNet, len(p.AllowedIPs)),
		}
		for i, pfx := range p.AllowedIPs {
			pc.AllowedIPs[i] = ipNet(pfx)
		}
		if p.Endpoint != "" {
			ap, err := resolve(p.Endpoint)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("pops row %q: %w; keeping its current endpoint", p.ID, err))
			case slices.ContainsFunc(routed, func(q netip.Prefix) bool { return q.Contains(ap.Addr()) }):
				errs = append(errs, fmt.Errorf("pops row %q: endpoint %s (%s) lies inside the overlay's allowed IPs: its packets would loop through the tunnel", p.ID, p.Endpoint, ap.Addr()))
				continue
			default:
				pc.Endpoint = net.UDPAddrFromAddrPort(ap)
			}
		}
		cfg.Peers = append(cfg.Peers, pc)
	}
	return cfg, errs
}

// Plan is the change DiffPeers found: peers to add, peers to update in
// place, peers to remove. A peer in none of them is left untouched.
type Plan struct {
	Add    []wgtypes.PeerConfig
	Update []wgtypes.PeerConfig
	Remove []wgtypes.Key
}

// Empty reports whether there is nothing to change.
func (p Plan) Empty() bool { return len(p.Add)+len(p.Update)+len(p.Remove) == 0 }

// Config is the plan as one wgtypes.Config, ReplacePeers false. Removals
// come first, so a prefix moving from a removed peer to a new one ends on
// the new one.
func (p Plan) Config() wgtypes.Config {
	cfg := wgtypes.Config{ReplacePeers: false}
	for _, k := range p.Remove {
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: k, Remove: true})
	}
	cfg.Peers = append(cfg.Peers, p.Add...)
	cfg.Peers = append(cfg.Peers, p.Update...)
	return cfg
}

// DiffPeers compares the device's current peers with the desired ones.
//
// A desired peer the device lacks is added. A peer the device has but no
// desired one names is removed. A peer on both is updated only when its
// allowed IPs (as a set), keepalive or endpoint differ, and an update sets
// only what differs (UpdateOnly, so a peer removed meanwhile is not
// recreated half-configured).
//
// Endpoints need care: WireGuard roams, moving a peer's endpoint to
// wherever its authenticated packets come from (a NAT's new port, say).
// configured holds the endpoint this mesh last set for each peer; when the
// desired endpoint equals it, the difference is the peer's own roaming and
// is left alone. A desired endpoint of nil never counts as a change.
func DiffPeers(current []wgtypes.Peer, desired []wgtypes.PeerConfig, configured map[wgtypes.Key]netip.AddrPort) Plan {
	var plan Plan
	have := make(map[wgtypes.Key]wgtypes.Peer, len(current))
	for _, p := range current {
		have[p.PublicKey] = p
	}
	want := make(map[wgtypes.Key]bool, len(desired))
	for _, d := range desired {
		want[d.PublicKey] = true
		cur, ok := have[d.PublicKey]
		if !ok {
			plan.Add = append(plan.Add, d)
			continue
		}
		upd := wgtypes.PeerConfig{PublicKey: d.PublicKey, UpdateOnly: true}
		changed := false
		if !samePrefixes(cur.AllowedIPs, d.AllowedIPs) {
			upd.ReplaceAllowedIPs, upd.AllowedIPs = true, d.AllowedIPs
			changed = true
		}
		if d.PersistentKeepaliveInterval != nil && *d.PersistentKeepaliveInterval != cur.PersistentKeepaliveInterval {
			upd.PersistentKeepaliveInterval = d.PersistentKeepaliveInterval
			changed = true
		}
		if d.Endpoint != nil {
			want := d.Endpoint.AddrPort()
			want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
			last, known := configured[d.PublicKey]
			roamed := known && last == want
			if addrPort(cur.Endpoint) != want && !roamed {
				upd.Endpoint = d.Endpoint
				changed = true
			}
		}
		if changed {
			plan.Update = append(plan.Update, upd)
		}
	}
	for _, p := range current {
		if !want[p.PublicKey] {
			plan.Remove = append(plan.Remove, p.PublicKey)
		}
	}
	// Device order is the device's business; a stable order makes logs
	// and tests readable.
	slices.SortFunc(plan.Remove, func(a, b wgtypes.Key) int { return strings.Compare(a.String(), b.String()) })
	return plan
}

func addrPort(a *net.UDPAddr) netip.AddrPort {
	if a == nil {
		return netip.AddrPort{}
	}
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func samePrefixes(a, b []net.IPNet) bool {
	pa, pb := prefixSet(a), prefixSet(b)
	return slices.Equal(pa, pb)
}

// prefixSet is the sorted, de-duplicated set of prefixes, IPv4 unmapped.
func prefixSet(ns []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ns))
	for _, n := range ns {
		if p, ok := prefixOf(n); ok {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

func prefixOf(n net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits == 128 && a.Is4() {
		ones -= 96
	}
	if bits == 0 || ones < 0 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones).Masked(), true
}

func ipNet(p netip.Prefix) net.IPNet {
	p = p.Masked()
	return net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func endpointString(a *net.UDPAddr) string {
	if a == nil {
		return "(none)"
	}
	return addrPort(a).String()
}

func prefixesString(ns []net.IPNet) string {
	ps := prefixSet(ns)
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
