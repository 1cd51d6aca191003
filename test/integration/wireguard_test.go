//go:build linux

package integration

import (
	"bytes"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/overlay"
)

// popAOverlayInBinary says who runs POP A's end of the tunnel: false, the
// test process (overlay.Open inside POP A's namespace, Reconcile called by
// the test); true, the edgeproxy binary under test, from the EDGEPROXY_WG_*
// environment, reconciling on its own reloads. Flip it once `edgeproxy run`
// opens the mesh; nothing else in the test changes.
const popAOverlayInBinary = true

// The overlay test's addresses. The POPs share only the underlay veth; the
// backend's subnet is behind POP B alone.
const (
	underlayA   = "192.168.77.1"
	underlayB   = "192.168.77.2"
	popBBackend = "10.60.2.1"
	wgBackendIP = "10.60.2.2"
	backendNet  = "10.60.2.0/24"
	overlayA    = "10.50.1.1"
	overlayB    = "10.50.2.1"
	wgPort      = 51820
	// reloadSecs is EDGEPROXY_DB_RELOAD_SECS for the binary: the bound
	// within which a changed pops table must be applied.
	reloadSecs = 1
)

// wgPop is one pops row of the test database.
type wgPop struct {
	id, publicKey, endpoint, wgIP, allowedIPs string
}

func writePops(t testing.TB, path string, rows []wgPop) {
	t.Helper()
	// The proxy reads the file as it likes: wait out its read locks.
	db, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer db.Close()
	// One transaction: the proxy reloading meanwhile sees the old table or
	// the new one, never an empty one in between.
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`CREATE TABLE IF NOT EXISTS pops (
		id TEXT PRIMARY KEY, region TEXT, wg_public_key TEXT NOT NULL,
		endpoint TEXT, wg_ip TEXT NOT NULL, allowed_ips TEXT NOT NULL,
		deleted INTEGER DEFAULT 0)`); err != nil {
		t.Fatalf("create pops in %s: %v", path, err)
	}
	if _, err := tx.Exec(`DELETE FROM pops`); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if _, err := tx.Exec(`INSERT INTO pops VALUES (?, 'sa', ?, ?, ?, ?, 0)`, r.id, r.publicKey, r.endpoint, r.wgIP, r.allowedIPs); err != nil {
			t.Fatalf("insert pop %s: %v", r.id, err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// wgIfaceName is unique per test: userspace devices of every namespace
// share /var/run/wireguard, so two of one name would collide there.
func wgIfaceName(role string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return "wgt" + role + hex.EncodeToString(b)
}

// openMesh runs the overlay end of a POP from the test process, inside ns,
// and closes it at cleanup.
func openMesh(t *testing.T, ns *nettest.NS, s overlay.Settings, logs io.Writer) *overlay.Mesh {
	t.Helper()
	var m *overlay.Mesh
	err := ns.Do(func() (err error) {
		m, err = overlay.Open(s, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		return err
	})
	if err != nil {
		t.Fatalf("open overlay %s in %s: %v", s.Interface, ns.Name, err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close overlay %s: %v", s.Interface, err)
		}
	})
	return m
}

// peersIn reads iface's peers from inside ns (a kernel device is only
// visible there; a userspace one answers on its socket from anywhere).
func peersIn(t *testing.T, ns *nettest.NS, iface string, pops []overlay.Pop) map[string]overlay.PeerStatus {
	t.Helper()
	var st overlay.Status
	if err := ns.Do(func() (err error) {
		st, err = overlay.ReadStatus(iface, pops)
		return err
	}); err != nil {
		t.Fatalf("read %s in %s: %v", iface, ns.Name, err)
	}
	peers := map[string]overlay.PeerStatus{}
	for _, p := range st.Peers {
		peers[p.Name()] = p
	}
	return peers
}

// waitPeers polls until cond holds for iface's peers, at most bound.
func waitPeers(t *testing.T, ns *nettest.NS, iface string, pops []overlay.Pop, bound time.Duration, what string, cond func(map[string]overlay.PeerStatus) bool) map[string]overlay.PeerStatus {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		peers := peersIn(t, ns, iface, pops)
		if cond(peers) {
			return peers
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; peers of %s: %v", what, bound, iface, peers)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitRoute polls `ip route show prefix` in ns until cond holds, at most
// bound.
func waitRoute(t *testing.T, ns *nettest.NS, prefix string, bound time.Duration, what string, cond func(route string) bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		r := strings.TrimSpace(nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", prefix))
		if cond(r) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; route: %q", what, bound, r)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// greetAndEcho dials the proxy from the client, checks the backend's
// greeting, then sends size random bytes and checks every one comes back.
// It returns the connection, open, for more.
func greetAndEcho(t *testing.T, client *nettest.NS, wantID string, size int) *net.TCPConn {
	t.Helper()
	c, err := nettest.Dial(client, proxyAddr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial proxy %s: %v", proxyAddr, err)
	}
	got, err := nettest.ReadLine(c, 5*time.Second)
	if err != nil || got != "hello from "+wantID {
		c.Close()
		t.Fatalf("greeting through the overlay: %q, %v; want %q", got, err, "hello from "+wantID)
	}
	echo(t, c, size)
	return c
}

func echo(t *testing.T, c *net.TCPConn, size int) {
	t.Helper()
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	sent := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		sent <- err
	}()
	back := make([]byte, size)
	if _, err := io.ReadFull(c, back); err != nil {
		t.Fatalf("read %d echoed bytes: %v", size, err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("send %d bytes: %v", size, err)
	}
	if !bytes.Equal(back, payload) {
		t.Fatalf("the %d bytes echoed through the overlay differ from those sent", size)
	}
}

// TestWireGuardOverlay: POP A reaches a backend that only POP B can reach,
// through the WireGuard overlay the pops table describes, on the sockmap
// plane; a peer added later leaves the established tunnel and its
// connections alone; the far POP's row deleted, its peer and route go
// within the reload bound; closing removes the interface.
func TestWireGuardOverlay(t *testing.T) {
	nettest.RequireRoot(t)
	client := nettest.NewNS(t, "cli")
	popA := nettest.NewNS(t, "popa")
	popB := nettest.NewNS(t, "popb")
	backend := nettest.NewNS(t, "bak")
	nettest.Link(t, client, nettest.ClientIP+"/24", popA, nettest.ProxyClientIP+"/24")
	nettest.Link(t, popA, underlayA+"/24", popB, underlayB+"/24")
	nettest.Link(t, popB, popBBackend+"/24", backend, wgBackendIP+"/24")
	// The backend answers the overlay through POP B, which forwards
	// between its tunnel and the backend's subnet.
	nettest.MustRun(t, "ip", "-n", backend.Name, "route", "add", "default", "via", popBBackend)
	nettest.MustRun(t, "ip", "netns", "exec", popB.Name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	nettest.Serve(t, backend, net.JoinHostPort(wgBackendIP, "9000"), nettest.Greeter("backend-b"))

	// Without the overlay, POP A has no way to the backend.
	if c, err := nettest.Dial(popA, net.JoinHostPort(wgBackendIP, "9000"), 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("POP A reaches the backend without the overlay: the topology leaks")
	}

	dir := t.TempDir()
	keyA, keyB := filepath.Join(dir, "pop-a.key"), filepath.Join(dir, "pop-b.key")
	privA, err := overlay.WriteKeyFile(keyA, false)
	if err != nil {
		t.Fatal(err)
	}
	privB, err := overlay.WriteKeyFile(keyB, false)
	if err != nil {
		t.Fatal(err)
	}
	ifaceA, ifaceB := wgIfaceName("a"), wgIfaceName("b")
	rowA := wgPop{"pop-a", privA.PublicKey().String(), net.JoinHostPort(underlayA, strconv.Itoa(wgPort)), overlayA, overlayA + "/32"}
	rowB := wgPop{"pop-b", privB.PublicKey().String(), net.JoinHostPort(underlayB, strconv.Itoa(wgPort)), overlayB, overlayB + "/32," + backendNet}
	settingsA := overlay.Settings{Interface: ifaceA, PrivateKeyFile: keyA, ListenPort: wgPort, Address: netip.MustParsePrefix(overlayA + "/16"), PopID: "pop-a"}
	settingsB := overlay.Settings{Interface: ifaceB, PrivateKeyFile: keyB, ListenPort: wgPort, Address: netip.MustParsePrefix(overlayB + "/16"), PopID: "pop-b"}

	meshLogs := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("overlay log (test process):\n%s", meshLogs.String())
		}
	})

	// POP B's overlay runs from the test process; it reads the same table.
	meshB := openMesh(t, popB, settingsB, meshLogs)

	// POP A's edgeproxy, on the sockmap plane, routes to the backend by
	// its address behind POP B.
	env := []string{"EDGEPROXY_DB_RELOAD_SECS=" + strconv.Itoa(reloadSecs), "EDGEPROXY_WG_INTERFACE="}
	if popAOverlayInBinary {
		env = []string{
			"EDGEPROXY_DB_RELOAD_SECS=" + strconv.Itoa(reloadSecs),
			"EDGEPROXY_WG_INTERFACE=" + ifaceA,
			"EDGEPROXY_WG_PRIVATE_KEY_FILE=" + keyA,
			"EDGEPROXY_WG_LISTEN_PORT=" + strconv.Itoa(wgPort),
			"EDGEPROXY_WG_ADDRESS=" + settingsA.Address.String(),
			"EDGEPROXY_POP_ID=pop-a",
		}
	}
	proxy := startProxy(t, popA, "sockmap", []backendRow{{ID: "backend-b", Region: "sa", Country: "BR", Addr: wgBackendIP, Port: 9000, Healthy: true, Weight: 1, Soft: 1000}}, env...)
	db := proxy.DBPath

	// setPops writes the table and applies it on both ends: POP B from the
	// test; POP A from the test too, or by the binary's own reload.
	var meshA *overlay.Mesh
	if !popAOverlayInBinary {
		meshA = openMesh(t, popA, settingsA, meshLogs)
	}
	setPops := func(rows ...wgPop) []overlay.Pop {
		t.Helper()
		writePops(t, db, rows)
		pops, rowErrs, err := overlay.LoadPops(db)
		if err != nil || len(rowErrs) > 0 {
			t.Fatalf("load pops: %v %v", err, rowErrs)
		}
		if err := meshB.Reconcile(pops); err != nil {
			t.Fatalf("reconcile POP B: %v", err)
		}
		if meshA != nil {
			if err := meshA.Reconcile(pops); err != nil {
				t.Fatalf("reconcile POP A: %v", err)
			}
		}
		return pops
	}
	// How long POP A may take to apply a change: at once when the test
	// reconciles; one reload interval plus slack when the binary does.
	bound := 100 * time.Millisecond
	if popAOverlayInBinary {
		bound = reloadSecs*time.Second + 2*time.Second
	}

	pops := setPops(rowA, rowB)
	waitPeers(t, popA, ifaceA, pops, bound, "POP A has POP B as a peer", func(p map[string]overlay.PeerStatus) bool {
		b, ok := p["pop-b"]
		return ok && b.Endpoint == rowB.endpoint
	})
	waitRoute(t, popA, backendNet, time.Second, "POP A routes "+backendNet+" via "+ifaceA+" from "+overlayA, func(r string) bool {
		return strings.Contains(r, "dev "+ifaceA) && strings.Contains(r, "src "+overlayA)
	})

	// Both ends are configured within a millisecond and both send a
	// keepalive at once, so their handshake initiations can cross: one
	// side then gets an invalid response and retries after WireGuard's
	// REKEY_TIMEOUT (5 s, plus jitter). Wait for the tunnel rather than
	// ask the first connection to beat that retry.
	waitPeers(t, popA, ifaceA, pops, 12*time.Second, "POP A's peer pop-b has a handshake", func(p map[string]overlay.PeerStatus) bool {
		return !p["pop-b"].HandshakeNever()
	})

	// A client through POP A's proxy reaches the backend behind POP B,
	// byte-exact, and the bytes went through the tunnel.
	held := greetAndEcho(t, client, "backend-b", 256<<10)
	defer held.Close()
	// wireguard-go adds a batch to tx_bytes only once sendmmsg has
	// returned (Peer.SendBuffers), so the echo of the last batch can reach
	// the client before its goroutine, preempted on a busy machine, counts
	// it: the counters catch up, they are not current when the echo is.
	peersA := waitPeers(t, popA, ifaceA, pops, 2*time.Second, "POP A's peer pop-b has a handshake and >= 256 KiB each way after the exchange",
		func(p map[string]overlay.PeerStatus) bool {
			b := p["pop-b"]
			return !b.HandshakeNever() && b.TxBytes >= 256<<10 && b.RxBytes >= 256<<10
		})
	tunnel := peersA["pop-b"]
	if a, ok := peersIn(t, popB, ifaceB, pops)["pop-a"]; !ok || a.HandshakeNever() {
		t.Fatalf("POP B's peer pop-a: %+v, present %v; want a handshake", a, ok)
	}
	checkWGStatusCommand(t, popA, ifaceA, db)

	// A new row adds a peer and leaves pop-b alone: same session (the
	// handshake time of a re-created peer would be reset), and the
	// connection opened before still carries bytes.
	rowC := wgPop{"pop-c", publicKeyOnly(t), "192.168.77.3:51820", "10.50.3.1", "10.50.3.1/32"}
	pops = setPops(rowA, rowB, rowC)
	peersA = waitPeers(t, popA, ifaceA, pops, bound, "POP A adds pop-c", func(p map[string]overlay.PeerStatus) bool {
		_, ok := p["pop-c"]
		return ok
	})
	if got := peersA["pop-b"]; !got.LatestHandshake.Equal(tunnel.LatestHandshake) || got.TxBytes < tunnel.TxBytes {
		t.Fatalf("adding pop-c disturbed pop-b: before %+v, after %+v", tunnel, got)
	}
	echo(t, held, 64<<10)

	// POP B's row deleted: its peer and its route leave POP A within the
	// reload bound; pop-c stays. Peers are named with the table that still
	// has pop-b, so a leftover shows as "pop-b" rather than as a bare key.
	withB := pops
	setPops(rowA, rowC)
	waitPeers(t, popA, ifaceA, withB, bound, "POP A drops pop-b", func(p map[string]overlay.PeerStatus) bool {
		_, b := p["pop-b"]
		_, c := p["pop-c"]
		return !b && c
	})
	// The route goes right after the peer, in the same reconcile.
	waitRoute(t, popA, backendNet, time.Second, "POP A stops routing "+backendNet+" after pop-b left", func(r string) bool { return r == "" })
	// And the backend is out of reach again: the proxy closes the client
	// without a greeting.
	if c, err := nettest.Dial(client, proxyAddr, 2*time.Second); err == nil {
		line, rerr := nettest.ReadLine(c, 3*time.Second)
		c.Close()
		if rerr == nil {
			t.Fatalf("after pop-b left, a client still got %q", line)
		}
	}

	// Closing removes the interface and its UAPI socket.
	if meshA != nil {
		if err := meshA.Close(); err != nil {
			t.Fatal(err)
		}
	} else {
		proxy.stop(t)
	}
	if out, err := popA.Command("ip", "link", "show", ifaceA).CombinedOutput(); err == nil {
		t.Fatalf("%s still exists after close:\n%s", ifaceA, out)
	}
	if _, err := os.Stat("/var/run/wireguard/" + ifaceA + ".sock"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("UAPI socket of %s left behind: %v", ifaceA, err)
	}
}

// checkWGStatusCommand runs `edgeproxy wg status` in POP A beside the
// running overlay, once the binary has the command.
func checkWGStatusCommand(t *testing.T, ns *nettest.NS, iface, db string) {
	t.Helper()
	if err := exec.Command(binary, "wg", "status", "--help").Run(); err != nil {
		t.Logf("edgeproxy has no `wg status` command yet (%v); not checking it", err)
		return
	}
	cmd := ns.Command(binary, "wg", "status", "--json", "--interface", iface, "--db", db)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("edgeproxy wg status: %v\n%s", err, out)
	}
	var st overlay.Status
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("wg status --json: %v\n%s", err, out)
	}
	for _, p := range st.Peers {
		if p.ID == "pop-b" && !p.HandshakeNever() && p.RxBytes > 0 && p.TxBytes > 0 {
			return
		}
	}
	t.Fatalf("wg status lacks pop-b with a handshake and traffic:\n%s", out)
}

// publicKeyOnly is the public key of a fresh private key nobody keeps: a
// peer that exists only in the table.
func publicKeyOnly(t *testing.T) string {
	t.Helper()
	k, err := overlay.WriteKeyFile(filepath.Join(t.TempDir(), "unused.key"), false)
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey().String()
}
