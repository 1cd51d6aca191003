//go:build !linux

package overlay

import (
	"errors"
	"log/slog"
	"net/netip"

	"github.com/edgeproxy/edgeproxy/routing"
)

// errNotLinux: the overlay drives netlink, TUN and Linux's WireGuard.
var errNotLinux = errors.New("the wireguard overlay needs Linux")

// Mesh is this POP's WireGuard interface; off Linux it cannot be opened.
type Mesh struct {
	settings Settings
	log      *slog.Logger
	// Resolve turns endpoints into addresses.
	Resolve Resolver
}

// Open fails off Linux.
func Open(s Settings, log *slog.Logger) (*Mesh, error) { return nil, errNotLinux }

func (m *Mesh) Kind() string                  { return "" }
func (m *Mesh) Reason() string                { return errNotLinux.Error() }
func (m *Mesh) Interface() string             { return m.settings.Interface }
func (m *Mesh) Reconcile(pops []Pop) error    { return errNotLinux }
func (m *Mesh) Status() ([]PeerStatus, error) { return nil, errNotLinux }
func (m *Mesh) Sync(dbPath string) error      { return errNotLinux }
func (m *Mesh) Apply(t *routing.Table) error  { return errNotLinux }
func (m *Mesh) HostAddrs() []netip.Addr       { return nil }
func (m *Mesh) LoadOptions() routing.LoadOptions {
	return routing.LoadOptions{PopID: m.settings.PopID, HostAddrs: m.HostAddrs}
}
func (m *Mesh) Close() error { return nil }
