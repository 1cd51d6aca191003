//go:build linux

package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// wgDevice is one WireGuard interface of the mesh. The kernel and the
// userspace implementation are configured alike, through wgctrl; they
// differ in how the interface comes to exist and how it goes away.
type wgDevice interface {
	// Kind is "kernel" or "userspace".
	Kind() string
	// Start runs after the link is up: the userspace device binds its
	// UDP socket here.
	Start() error
	// Close removes what Open made: the link the kernel device created
	// (an existing one is left), the userspace device and its socket.
	Close() error
}

// uapiDir is where wireguard-go's UAPI sockets live; wgctrl looks there.
const uapiDir = "/var/run/wireguard"

// openDevice creates interface name in the namespace ns (the caller's).
// A kernel link comes first; when the kernel cannot make one (no module,
// most often), a userspace device runs in this process instead. reason
// says which and why, for the log.
//
// foreign says ns is not the process's namespace: wireguard-go then
// creates its sockets from its own goroutines, on threads in the process's
// namespace, unless told otherwise (nsBind, nsTUN).
func openDevice(nl *netlink.Handle, ns netns.NsHandle, foreign bool, name string, log *slog.Logger) (dev wgDevice, reason string, err error) {
	if link, err := nl.LinkByName(name); err == nil {
		if link.Type() == "wireguard" {
			// A kernel link left by an earlier run (killed before it
			// could remove it) or made by hand: adopt it, never delete it.
			return &kernelDevice{nl: nl, name: name}, "kernel wireguard link " + name + " already exists; reusing it and leaving it in place at exit", nil
		}
		return nil, "", fmt.Errorf("wireguard interface %s: a %s link of that name exists already: remove it or set EDGEPROXY_WG_INTERFACE to another name", name, link.Type())
	}
	kerr := nl.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}})
	if kerr == nil {
		return &kernelDevice{nl: nl, name: name, created: true}, "the kernel created a wireguard link", nil
	}
	u, uerr := openUserspace(name, ns, foreign, log)
	if uerr != nil {
		return nil, "", fmt.Errorf("wireguard interface %s: kernel link: %w; userspace device: %w", name, kerr, uerr)
	}
	return u, fmt.Sprintf("kernel wireguard unavailable (create link type wireguard: %v); running wireguard-go in this process", kerr), nil
}

// kernelDevice is a wireguard link of the kernel's own implementation.
type kernelDevice struct {
	nl      *netlink.Handle
	name    string
	created bool
}

func (d *kernelDevice) Kind() string { return "kernel" }
func (d *kernelDevice) Start() error { return nil }

func (d *kernelDevice) Close() error {
	if !d.created {
		return nil
	}
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("remove wireguard link %s: %w", d.name, err)
	}
	if err := d.nl.LinkDel(link); err != nil {
		return fmt.Errorf("remove wireguard link %s: %w", d.name, err)
	}
	return nil
}

// userspaceDevice is wireguard-go on a TUN device, inside this process. Its
// UAPI socket lets wgctrl, here and in other processes, configure and read
// it as it would a kernel link.
type userspaceDevice struct {
	dev      *device.Device
	uapi     net.Listener
	accepted chan struct{} // closed when the UAPI accept loop ends
	closing  atomic.Bool   // Close has begun: the accept loop's end is expected
}

func openUserspace(name string, ns netns.NsHandle, foreign bool, log *slog.Logger) (*userspaceDevice, error) {
	// The TUN and its netlink watcher are created here, on the calling
	// thread, so they belong to the caller's namespace.
	t, err := tun.CreateTUN(name, device.DefaultMTU)
	if err != nil {
		return nil, fmt.Errorf("create tun %s: %w", name, err)
	}
	bind := conn.NewDefaultBind()
	if foreign {
		t = &nsTUN{Device: t, ns: ns}
		bind = &nsBind{Bind: bind, ns: ns}
	}
	dev := device.NewDevice(t, bind, deviceLogger(log, name))
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("open uapi socket %s: %w", filepath.Join(uapiDir, name+".sock"), err)
	}
	ln, err := ipc.UAPIListen(name, f)
	f.Close() // UAPIListen holds its own descriptor
	if err != nil {
		os.Remove(filepath.Join(uapiDir, name+".sock"))
		dev.Close()
		return nil, fmt.Errorf("listen on uapi socket %s: %w", filepath.Join(uapiDir, name+".sock"), err)
	}
	u := &userspaceDevice{dev: dev, uapi: ln, accepted: make(chan struct{})}
	go u.serveUAPI(log.With("interface", name))
	return u, nil
}

// serveUAPI answers wgctrl. It ends when the listener is closed, or when
// someone deletes the socket file (UAPIListen watches it); the device keeps
// forwarding then, but can no longer be configured or read.
func (u *userspaceDevice) serveUAPI(log *slog.Logger) {
	defer close(u.accepted)
	for {
		c, err := u.uapi.Accept()
		if err != nil {
			if !u.closing.Load() {
				log.Warn("wireguard uapi socket gone: the device keeps running but can no longer be configured or read", "err", err)
			}
			return
		}
		go u.dev.IpcHandle(c)
	}
}

func (u *userspaceDevice) Kind() string { return "userspace" }

// Start brings the device up now, which binds its UDP socket, rather than
// whenever the TUN's "link up" event reaches wireguard-go's event loop: a
// peer configured before that would wait for its first handshake.
func (u *userspaceDevice) Start() error {
	if err := u.dev.Up(); err != nil {
		return fmt.Errorf("start userspace device: %w", err)
	}
	return nil
}

func (u *userspaceDevice) Close() error {
	// Close the socket first, so no configuration races the teardown;
	// closing the device closes the TUN, and the kernel removes the link
	// with its addresses and routes.
	u.closing.Store(true)
	err := u.uapi.Close()
	u.dev.Close()
	<-u.accepted
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("close uapi socket: %w", err)
	}
	return nil
}

// nsBind opens wireguard-go's UDP sockets in ns. wireguard-go opens them
// from whichever goroutine brings the device up or changes its port (the
// TUN event loop, a UAPI request), whose thread is in the process's
// namespace: without this a device in another namespace would listen in
// the wrong one. Only used in that case (tests build POPs in namespaces);
// a plain StdNetBind keeps wireguard-go's sticky-socket route watcher.
type nsBind struct {
	conn.Bind
	ns netns.NsHandle
}

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	if nerr := inNetns(b.ns, func() error {
		fns, actual, err = b.Bind.Open(port)
		return nil
	}); nerr != nil {
		return nil, 0, nerr
	}
	return fns, actual, err
}

// nsTUN asks for the TUN's MTU in ns: wireguard-go reads it with an ioctl
// by interface name on a fresh socket, which would otherwise look the name
// up in the process's namespace.
type nsTUN struct {
	tun.Device
	ns netns.NsHandle
}

func (t *nsTUN) MTU() (mtu int, err error) {
	if nerr := inNetns(t.ns, func() error {
		mtu, err = t.Device.MTU()
		return nil
	}); nerr != nil {
		return 0, nerr
	}
	return mtu, err
}

// inNetns runs f on a fresh thread switched into ns, so sockets f creates
// belong to ns. The thread is not handed back to the scheduler if
// switching back fails: it dies with its goroutine instead of serving
// others in the wrong namespace.
func inNetns(ns netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", ns, err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leave network namespace %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// homeNetns identifies the process's own network namespace. It is read
// during package initialisation, when the runtime keeps the main goroutine
// on the main thread, so no thread switched by a caller can be mistaken for
// home. (/proc/self/ns/net would not do: it is the main thread's, and the
// main thread also runs goroutines, a namespace-switched one included.)
var homeNetns, homeNetnsErr = currentNetnsID()

func currentNetnsID() (string, error) {
	h, err := netns.Get()
	if err != nil {
		return "", err
	}
	defer h.Close()
	return h.UniqueId(), nil
}

// callerNetns is the namespace of the calling thread, and whether it is
// not the process's: the test's NS.Do, or any caller that locked its thread
// and switched namespace. When home is unknown, it says foreign: pinning
// sockets to the caller's namespace is then merely redundant.
func callerNetns() (ns netns.NsHandle, foreign bool, err error) {
	ns, err = netns.Get()
	if err != nil {
		return ns, false, fmt.Errorf("get network namespace: %w", err)
	}
	return ns, homeNetnsErr != nil || ns.UniqueId() != homeNetns, nil
}

// deviceLogger sends wireguard-go's log to slog: its errors as warnings
// (it recovers from them itself), its chatter as debug.
func deviceLogger(log *slog.Logger, name string) *device.Logger {
	l := log.With("interface", name)
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if l.Enabled(context.Background(), slog.LevelDebug) {
				l.Debug("wireguard-go: " + fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) {
			l.Warn("wireguard-go: " + fmt.Sprintf(format, args...))
		},
	}
}
