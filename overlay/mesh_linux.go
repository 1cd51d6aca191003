//go:build linux

package overlay

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// RouteProtocol marks the routes the mesh installs (`ip route show proto
// 77`), so it finds and removes exactly its own, also after a restart, and
// never one an operator or another daemon made. 77 is unassigned in
// iproute2's rt_protos.
const RouteProtocol netlink.RouteProtocol = 77

// Mesh is this POP's WireGuard interface, kept in line with the pops table.
// Its methods may be called from any goroutine.
type Mesh struct {
	settings Settings
	log      *slog.Logger
	key      wgtypes.Key
	// Resolve turns endpoints into addresses; ResolveEndpoint unless a
	// test sets another before the first Reconcile.
	Resolve Resolver

	mu          sync.Mutex
	dev         wgDevice
	reason      string
	client      *wgctrl.Client
	nl          *netlink.Handle
	ns          netns.NsHandle
	linkIndex   int
	configured  map[wgtypes.Key]netip.AddrPort // endpoint last set per peer
	ids         map[wgtypes.Key]string         // pop id per peer key
	lastRowErrs string                         // the skipped rows last logged
	closed      bool
}

// Open creates and configures the interface: a kernel wireguard link when
// the kernel can make one, else a userspace device in this process (the
// log says which and why). It sets the private key and listen port,
// assigns s.Address, brings the link up, and returns a mesh with no peers
// yet: call Reconcile (or Sync) next.
//
// The interface is made in the network namespace of the calling thread. To
// build it in another namespace, call Open from a thread locked into it
// (runtime.LockOSThread, then setns); everything the mesh does later,
// from any goroutine, still happens in that namespace.
func Open(s Settings, log *slog.Logger) (*Mesh, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	key, loose, err := ReadKeyFile(s.PrivateKeyFile)
	if err != nil {
		return nil, fmt.Errorf("wireguard interface %s: %w", s.Interface, err)
	}
	if loose {
		log.Warn("wireguard private key file is readable by group or others; chmod 600 it", "path", s.PrivateKeyFile)
	}
	m := &Mesh{
		settings:   s,
		log:        log,
		key:        key,
		Resolve:    ResolveEndpoint,
		configured: map[wgtypes.Key]netip.AddrPort{},
		ids:        map[wgtypes.Key]string{},
		ns:         netns.None(),
	}
	if err := m.open(); err != nil {
		m.teardown()
		return nil, fmt.Errorf("wireguard interface %s: %w", s.Interface, err)
	}
	port := s.ListenPort
	if d, err := m.client.Device(s.Interface); err == nil {
		port = d.ListenPort // the one picked when ListenPort is 0
	}
	log.Info("wireguard overlay up", "interface", s.Interface, "device", m.dev.Kind(), "reason", m.reason,
		"address", s.Address.String(), "listen_port", port, "public_key", key.PublicKey().String(), "pop_id", s.PopID)
	return m, nil
}

func (m *Mesh) open() error {
	s := m.settings
	ns, foreign, err := callerNetns()
	if err != nil {
		return err
	}
	m.ns = ns
	if m.nl, err = netlink.NewHandleAt(ns); err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	if m.dev, m.reason, err = openDevice(m.nl, ns, foreign, s.Interface, m.log); err != nil {
		return err
	}
	// wgctrl's kernel client talks generic netlink on a socket made now, on
	// this thread: in the namespace of the interface.
	if m.client, err = wgctrl.New(); err != nil {
		return fmt.Errorf("open wgctrl: %w", err)
	}
	port := s.ListenPort
	if err := m.client.ConfigureDevice(s.Interface, wgtypes.Config{PrivateKey: &m.key, ListenPort: &port}); err != nil {
		return fmt.Errorf("set private key and listen port %d: %w", port, err)
	}
	link, err := m.nl.LinkByName(s.Interface)
	if err != nil {
		return fmt.Errorf("find link: %w", err)
	}
	m.linkIndex = link.Attrs().Index
	// Replace, not add: an adopted link may carry the address already.
	if err := m.nl.AddrReplace(link, &netlink.Addr{IPNet: hostNet(s.Address)}); err != nil {
		return fmt.Errorf("assign address %s: %w", s.Address, err)
	}
	if err := m.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("set link up: %w", err)
	}
	return m.dev.Start()
}

// teardown releases whatever open got to, in reverse.
func (m *Mesh) teardown() error {
	var errs []error
	if m.client != nil {
		m.client.Close()
	}
	if m.dev != nil {
		if err := m.dev.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if m.nl != nil {
		m.nl.Close()
	}
	if m.ns.IsOpen() {
		m.ns.Close()
	}
	return errors.Join(errs...)
}

// Kind is "kernel" or "userspace".
func (m *Mesh) Kind() string { return m.dev.Kind() }

// Reason says why this kind of device runs, for logs and status pages.
func (m *Mesh) Reason() string { return m.reason }

// Interface is the interface's name.
func (m *Mesh) Interface() string { return m.settings.Interface }

// Reconcile makes the interface's peers and routes match pops (this POP's
// own row, id == PopID, is not a peer). Peers are added, updated in place
// or removed as DiffPeers plans; an unchanged peer is not touched, so its
// session and the connections through it go on. Then a route via the
// interface is added for each peer's allowed IPs and the mesh's routes
// that no peer claims any more are deleted.
//
// The returned error joins what could not be applied (a peer whose
// endpoint does not resolve, a route that conflicts with one the mesh does
// not own); everything else is applied all the same, so log it and carry
// on.
func (m *Mesh) Reconcile(pops []Pop) error {
	// Name resolution may wait on DNS: do it before taking the lock so
	// Status and scrapes are not held up.
	desired, errs := DesiredConfig(m.settings, m.key, pops, m.Resolve)

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("wireguard interface %s: reconcile: %w", m.settings.Interface, ErrClosed)
	}
	dev, err := m.client.Device(m.settings.Interface)
	if err != nil {
		return fmt.Errorf("wireguard interface %s: read peers: %w", m.settings.Interface, err)
	}
	plan := DiffPeers(dev.Peers, desired.Peers, m.configured)
	if !plan.Empty() {
		if err := m.client.ConfigureDevice(m.settings.Interface, plan.Config()); err != nil {
			return fmt.Errorf("wireguard interface %s: configure peers (%d to add, %d to update, %d to remove): %w",
				m.settings.Interface, len(plan.Add), len(plan.Update), len(plan.Remove), err)
		}
	}
	oldIDs := m.ids
	m.ids = idsByKey(pops)
	m.logPlan(plan, oldIDs)

	want := map[wgtypes.Key]bool{}
	for _, p := range desired.Peers {
		want[p.PublicKey] = true
		if p.Endpoint != nil {
			m.configured[p.PublicKey] = addrPort(p.Endpoint)
		}
	}
	for k := range m.configured {
		if !want[k] {
			delete(m.configured, k)
		}
	}

	var prefixes []netip.Prefix
	for _, p := range desired.Peers {
		prefixes = append(prefixes, prefixSet(p.AllowedIPs)...)
	}
	errs = append(errs, m.syncRoutes(prefixes)...)
	if len(errs) > 0 {
		return fmt.Errorf("wireguard interface %s: %w", m.settings.Interface, errors.Join(errs...))
	}
	return nil
}

func (m *Mesh) logPlan(plan Plan, oldIDs map[wgtypes.Key]string) {
	name := func(k wgtypes.Key, ids map[wgtypes.Key]string) string {
		if id, ok := ids[k]; ok {
			return id
		}
		return k.String()
	}
	for _, p := range plan.Add {
		m.log.Info("wireguard peer added", "interface", m.settings.Interface, "peer", name(p.PublicKey, m.ids),
			"endpoint", endpointString(p.Endpoint), "allowed_ips", prefixesString(p.AllowedIPs))
	}
	for _, p := range plan.Update {
		var what []string
		if p.ReplaceAllowedIPs {
			what = append(what, "allowed_ips="+prefixesString(p.AllowedIPs))
		}
		if p.Endpoint != nil {
			what = append(what, "endpoint="+endpointString(p.Endpoint))
		}
		if p.PersistentKeepaliveInterval != nil {
			what = append(what, "keepalive="+p.PersistentKeepaliveInterval.String())
		}
		m.log.Info("wireguard peer updated", "interface", m.settings.Interface, "peer", name(p.PublicKey, m.ids), "changed", strings.Join(what, " "))
	}
	for _, k := range plan.Remove {
		m.log.Info("wireguard peer removed", "interface", m.settings.Interface, "peer", name(k, oldIDs))
	}
}

// syncRoutes adds a route via the interface for each prefix and deletes
// the mesh's own routes (RouteProtocol) for prefixes no longer wanted. The
// source is this POP's overlay address, so backends see (and answer) the
// overlay address rather than an underlay one.
func (m *Mesh) syncRoutes(prefixes []netip.Prefix) []error {
	var errs []error
	ours, err := m.nl.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{LinkIndex: m.linkIndex, Protocol: RouteProtocol}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return []error{fmt.Errorf("list routes: %w", err)}
	}
	have := map[netip.Prefix]netlink.Route{}
	for _, r := range ours {
		if r.Dst == nil {
			continue
		}
		if p, ok := prefixOf(*r.Dst); ok {
			have[p] = r
		}
	}
	wanted := map[netip.Prefix]bool{}
	for _, p := range prefixes {
		wanted[p] = true
		if _, ok := have[p]; ok {
			continue
		}
		dst := ipNet(p)
		r := &netlink.Route{LinkIndex: m.linkIndex, Dst: &dst, Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}
		if src := m.settings.Address.Addr(); src.Is4() == p.Addr().Is4() {
			r.Src = net.IP(src.AsSlice())
		}
		err := m.nl.RouteAdd(r)
		if errors.Is(err, syscall.EEXIST) {
			err = m.explainExisting(p)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("add route %s: %w", p, err))
			continue
		}
		m.log.Debug("wireguard route added", "interface", m.settings.Interface, "dst", p.String())
	}
	for p, r := range have {
		if wanted[p] {
			continue
		}
		if err := m.nl.RouteDel(&r); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", p, err))
			continue
		}
		m.log.Debug("wireguard route deleted", "interface", m.settings.Interface, "dst", p.String())
	}
	return errs
}

// explainExisting turns "route exists" into nil when the existing route
// already leads into the interface (the link's own connected route, say),
// and otherwise into an error naming the device it leads to: the mesh never
// replaces a route it does not own.
func (m *Mesh) explainExisting(p netip.Prefix) error {
	dst := ipNet(p)
	family := netlink.FAMILY_V4
	if p.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	routes, err := m.nl.RouteListFiltered(family, &netlink.Route{Dst: &dst}, netlink.RT_FILTER_DST)
	if err != nil {
		return fmt.Errorf("a route to %s exists already and could not be read: %w", p, err)
	}
	if len(routes) == 0 {
		return fmt.Errorf("a route to %s exists already (of another type or metric) and is not the mesh's: not replacing it", p)
	}
	for _, r := range routes {
		if r.LinkIndex == m.linkIndex {
			return nil
		}
	}
	dev := fmt.Sprintf("ifindex %d", routes[0].LinkIndex)
	if l, err := m.nl.LinkByIndex(routes[0].LinkIndex); err == nil {
		dev = l.Attrs().Name
	}
	return fmt.Errorf("a route to %s via %s exists already and is not the mesh's: not replacing it", p, dev)
}

// Status reads the device's peers now, named by the pops rows of the last
// Reconcile, sorted by name.
func (m *Mesh) Status() ([]PeerStatus, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("wireguard interface %s: status: %w", m.settings.Interface, ErrClosed)
	}
	st, err := readStatus(m.client, m.settings.Interface, m.ids, time.Now())
	if err != nil {
		return nil, err
	}
	return st.Peers, nil
}

// Apply makes the interface's peers and routes match t.Pops, the pops
// table of a routing snapshot (routing.Store reads it with the backends,
// under the same rules, so one watcher drives both). Call it with every
// table the store publishes; applying an unchanged table changes nothing
// and repairs a peer or route someone removed by hand. Skipped rows are the
// store's to report (its RowErrors), not Apply's. The error is Reconcile's.
func (m *Mesh) Apply(t *routing.Table) error {
	if t == nil {
		return nil
	}
	return m.Reconcile(t.Pops)
}

// LoadOptions are the overlay's part of routing.LoadOptions: this POP's id,
// whose row is not a peer, and HostAddrs, so the routing store skips a pops
// row whose allowed_ips would capture one of this host's own addresses.
func (m *Mesh) LoadOptions() routing.LoadOptions {
	return routing.LoadOptions{PopID: m.settings.PopID, HostAddrs: m.HostAddrs}
}

// HostAddrs lists the addresses of every interface in the mesh's network
// namespace (the overlay's own included), as the kernel has them now. On
// failure it returns nil, which checks nothing: a pops row is never
// refused for a lookup that failed.
func (m *Mesh) HostAddrs() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	addrs, err := m.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		m.log.Warn("cannot list this host's addresses; pops rows are not checked against them", "interface", m.settings.Interface, "err", err)
		return nil
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out
}

// Sync reads the pops table from dbPath (routing.LoadPops, with this
// mesh's LoadOptions) and reconciles to it. Skipped rows are logged ("pops
// row skipped", once per distinct set, not at every call); the error is
// the reconcile's, or the database's, in which case nothing changes.
//
// Sync serves callers that have no routing store; `edgeproxy run`
// hands the store's tables to Apply instead (cmd/edgeproxy startOverlay).
func (m *Mesh) Sync(dbPath string) error {
	pops, rowErrs, err := routing.LoadPops(dbPath, m.LoadOptions())
	if err != nil {
		return fmt.Errorf("wireguard interface %s: %w; keeping the current peers", m.settings.Interface, err)
	}
	m.logRowErrors(asErrors(rowErrs))
	return m.Reconcile(pops)
}

func (m *Mesh) logRowErrors(rowErrs []error) {
	msg := errors.Join(rowErrs...)
	key := ""
	if msg != nil {
		key = msg.Error()
	}
	m.mu.Lock()
	same := key == m.lastRowErrs
	m.lastRowErrs = key
	m.mu.Unlock()
	if same {
		return
	}
	for _, e := range rowErrs {
		m.log.Warn("pops row skipped", "interface", m.settings.Interface, "err", e.Error())
	}
}

// Close removes the interface if Open created it (a userspace device is
// always Open's; an adopted kernel link stays), with its address and
// routes. Calling it again does nothing.
func (m *Mesh) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	if err := m.teardown(); err != nil {
		return fmt.Errorf("wireguard interface %s: close: %w", m.settings.Interface, err)
	}
	m.log.Info("wireguard overlay down", "interface", m.settings.Interface, "device", m.dev.Kind())
	return nil
}

// hostNet is the address with the overlay's prefix length, as `ip addr add
// 10.50.1.1/16` takes it (ipNet would mask the host part away).
func hostNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
