package overlay

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ErrNoInterface is returned when no WireGuard interface of the name exists:
// neither a kernel link in this network namespace nor a userspace device's
// UAPI socket under /var/run/wireguard.
var ErrNoInterface = errors.New("no such wireguard interface")

// ErrClosed is returned by a Mesh's methods after Close.
var ErrClosed = errors.New("mesh closed")

// Status is one WireGuard interface and its peers.
type Status struct {
	Interface string `json:"interface"`
	// Kind is "kernel" or "userspace".
	Kind       string       `json:"kind"`
	PublicKey  string       `json:"public_key"`
	ListenPort int          `json:"listen_port"`
	Peers      []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as the device sees it.
type PeerStatus struct {
	// ID is the pops row holding the peer's public key; empty when no row
	// does (a peer someone added by hand, or a row deleted since).
	ID         string   `json:"id"`
	PublicKey  string   `json:"public_key"`
	Endpoint   string   `json:"endpoint"`
	AllowedIPs []string `json:"allowed_ips"`
	// LatestHandshake is zero when the peer never completed a handshake.
	LatestHandshake time.Time `json:"latest_handshake,omitzero"`
	// HandshakeAge is the time since LatestHandshake at the time of the
	// reading; meaningless when LatestHandshake is zero.
	HandshakeAge time.Duration `json:"-"`
	RxBytes      int64         `json:"rx_bytes"`
	TxBytes      int64         `json:"tx_bytes"`
}

// Name is the peer's pop id, or its public key when no pops row names it.
func (p PeerStatus) Name() string {
	if p.ID != "" {
		return p.ID
	}
	return p.PublicKey
}

// HandshakeNever reports a peer that never completed a handshake.
func (p PeerStatus) HandshakeNever() bool { return p.LatestHandshake.IsZero() }

// MarshalJSON adds handshake_age_seconds, null for a peer that never
// completed a handshake, so scripts need no clock of their own.
func (p PeerStatus) MarshalJSON() ([]byte, error) {
	type plain PeerStatus
	var age *float64
	if !p.HandshakeNever() {
		s := p.HandshakeAge.Seconds()
		age = &s
	}
	return json.Marshal(struct {
		plain
		HandshakeAgeSeconds *float64 `json:"handshake_age_seconds"`
	}{plain(p), age})
}

// ReadStatus reads interface iface through wgctrl, which reaches a kernel
// device over netlink and a userspace one over its UAPI socket, so it works
// from any process, e.g. `edgeproxy wg status` beside a running proxy.
// Peers are named by the pops rows' public keys.
func ReadStatus(iface string, pops []Pop) (Status, error) {
	c, err := wgctrl.New()
	if err != nil {
		return Status{}, fmt.Errorf("wireguard interface %s: open wgctrl: %w", iface, err)
	}
	defer c.Close()
	return readStatus(c, iface, idsByKey(pops), time.Now())
}

func readStatus(c *wgctrl.Client, iface string, ids map[wgtypes.Key]string, now time.Time) (Status, error) {
	dev, err := c.Device(iface)
	if errors.Is(err, os.ErrNotExist) {
		return Status{}, fmt.Errorf("wireguard interface %s: %w (no kernel link, no socket /var/run/wireguard/%s.sock): is edgeproxy running with EDGEPROXY_WG_INTERFACE=%s?", iface, ErrNoInterface, iface, iface)
	}
	if err != nil {
		return Status{}, fmt.Errorf("wireguard interface %s: read device: %w", iface, err)
	}
	return StatusOf(dev, ids, now), nil
}

func idsByKey(pops []Pop) map[wgtypes.Key]string {
	ids := make(map[wgtypes.Key]string, len(pops))
	for _, p := range pops {
		ids[wgtypes.Key(p.PublicKey)] = p.ID
	}
	return ids
}

// StatusOf turns a wgctrl device into a Status at time now, peers sorted by
// name (pop id, else public key).
func StatusOf(dev *wgtypes.Device, ids map[wgtypes.Key]string, now time.Time) Status {
	st := Status{
		Interface:  dev.Name,
		Kind:       kindOf(dev.Type),
		PublicKey:  dev.PublicKey.String(),
		ListenPort: dev.ListenPort,
		Peers:      make([]PeerStatus, 0, len(dev.Peers)),
	}
	for _, p := range dev.Peers {
		ps := PeerStatus{
			ID:              ids[p.PublicKey],
			PublicKey:       p.PublicKey.String(),
			LatestHandshake: p.LastHandshakeTime,
			RxBytes:         p.ReceiveBytes,
			TxBytes:         p.TransmitBytes,
			AllowedIPs:      make([]string, 0, len(p.AllowedIPs)),
		}
		if p.Endpoint != nil {
			ps.Endpoint = addrPort(p.Endpoint).String()
		}
		for _, pfx := range prefixSet(p.AllowedIPs) {
			ps.AllowedIPs = append(ps.AllowedIPs, pfx.String())
		}
		if !ps.LatestHandshake.IsZero() {
			// Clocks step; an age below zero reads as "just now".
			ps.HandshakeAge = max(now.Sub(ps.LatestHandshake), 0)
		}
		st.Peers = append(st.Peers, ps)
	}
	slices.SortFunc(st.Peers, func(a, b PeerStatus) int {
		if c := strings.Compare(a.Name(), b.Name()); c != 0 {
			return c
		}
		return strings.Compare(a.PublicKey, b.PublicKey)
	})
	return st
}

func kindOf(t wgtypes.DeviceType) string {
	if t == wgtypes.LinuxKernel {
		return "kernel"
	}
	return t.String()
}

// WriteTable prints st as `edgeproxy wg status` does: one line for the
// interface, then a table of peers.
func WriteTable(w io.Writer, st Status) error {
	fmt.Fprintf(w, "interface %s (%s), public key %s, listening on UDP %d\n", st.Interface, st.Kind, st.PublicKey, st.ListenPort)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tPUBLIC KEY\tENDPOINT\tALLOWED IPS\tLATEST HANDSHAKE\tRX BYTES\tTX BYTES")
	for _, p := range st.Peers {
		id, ep, hs := p.ID, p.Endpoint, "never"
		if id == "" {
			id = "(not in pops)"
		}
		if ep == "" {
			ep = "(none)"
		}
		if !p.HandshakeNever() {
			hs = p.HandshakeAge.Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\n", id, p.PublicKey, ep, strings.Join(p.AllowedIPs, ","), hs, p.RxBytes, p.TxBytes)
	}
	return tw.Flush()
}
