// Package overlay builds and keeps the WireGuard overlay between POPs from the
// pops table of routing.db.
//
// The pieces:
//
//   - [LoadPops] reads and validates the pops table. Pure: no root needed.
//   - [DesiredConfig] and [DiffPeers] turn pops into the wgtypes
//     configuration the device should have, and into the smallest change
//     from what it has. Pure, and tested without root.
//   - [Open] creates the interface: a kernel WireGuard link when the kernel
//     can make one, else a userspace device (wireguard-go on a TUN) run
//     inside this process. Both are configured with the same wgctrl calls;
//     the userspace device answers them on its UAPI socket
//     (/var/run/wireguard/IFACE.sock), which is also how `edgeproxy wg
//     status` reads it from another process.
//   - [Mesh.Reconcile] adds, changes and removes peers and their routes to
//     match a new pops table, leaving unchanged peers alone so established
//     sessions through them are not disturbed.
//   - [NewCollector] reads handshake ages and byte counters at scrape time.
//
// The mesh touches only its own interface and the routes it marked as its
// own (protocol [RouteProtocol]).
package overlay
