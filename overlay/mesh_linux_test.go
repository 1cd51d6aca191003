//go:build linux

package overlay

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/routing"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestMeshInNamespace builds a mesh inside a namespace from this process:
// the interface, its UDP socket and its routes must all be there, none in
// the test's own namespace, and Close must take them away.
func TestMeshInNamespace(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNS(t, "wgm")
	keyFile := filepath.Join(t.TempDir(), "k")
	if _, err := WriteKeyFile(keyFile, false); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	iface := "wgu" + hex.EncodeToString(b)
	s := Settings{Interface: iface, PrivateKeyFile: keyFile, ListenPort: 51999, Address: netip.MustParsePrefix("10.50.9.1/16"), PopID: "me"}
	logs := &lockedBuffer{}
	fdsBefore := openFDs(t)
	var m *Mesh
	if err := ns.Do(func() (err error) {
		m, err = Open(s, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			m.Close()
		}
		if t.Failed() {
			t.Logf("mesh log:\n%s", logs.String())
		}
	})
	peer, err := ParsePopRow("peer", "sa", testKey(5).String(), "192.0.2.5:51820", "10.50.5.1", "10.50.5.1/32,10.70.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	// Reconcile from this goroutine, outside the namespace on purpose.
	if err := m.Reconcile([]Pop{peer}); err != nil {
		t.Fatal(err)
	}
	if out := nettest.MustRun(t, "ip", "netns", "exec", ns.Name, "ss", "-Huan", "sport", "= :51999"); !strings.Contains(out, "51999") {
		t.Errorf("no UDP socket on 51999 in the namespace:\n%s", out)
	}
	if out := nettest.MustRun(t, "ss", "-Huan", "sport", "= :51999"); strings.Contains(out, "51999") {
		t.Errorf("a UDP socket on 51999 in the test's own namespace:\n%s", out)
	}
	if out := nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", "proto", "77"); !strings.Contains(out, "10.70.0.0/16 dev "+iface) {
		t.Errorf("routes of proto 77:\n%s", out)
	}
	// A route someone deleted by hand comes back at the next reconcile.
	nettest.MustRun(t, "ip", "-n", ns.Name, "route", "del", "10.70.0.0/16")
	if err := m.Reconcile([]Pop{peer}); err != nil {
		t.Fatal(err)
	}
	if out := nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", "10.70.0.0/16"); !strings.Contains(out, "dev "+iface) {
		t.Errorf("route not repaired: %q", out)
	}
	// A prefix already routed elsewhere is reported, not taken over; the
	// peer is configured all the same.
	nettest.MustRun(t, "ip", "-n", ns.Name, "route", "add", "10.80.0.0/16", "dev", "lo")
	other, err := ParsePopRow("other", "sa", testKey(6).String(), "", "10.50.6.1", "10.50.6.1/32,10.80.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	err = m.Reconcile([]Pop{peer, other})
	if err == nil || !strings.Contains(err.Error(), "a route to 10.80.0.0/16 via lo exists already and is not the mesh's") {
		t.Errorf("conflicting route: err %v", err)
	}
	if out := nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", "10.80.0.0/16"); !strings.Contains(out, "dev lo") {
		t.Errorf("the route via lo was touched: %q", out)
	}
	if st, err := m.Status(); err != nil || len(st) != 2 || st[0].ID != "other" || st[1].ID != "peer" {
		t.Errorf("status %+v, %v: want other and peer", st, err)
	}
	// No pops: no peers, none of the mesh's routes, the others' intact.
	if err := m.Reconcile(nil); err != nil {
		t.Fatal(err)
	}
	if st, err := m.Status(); err != nil || len(st) != 0 {
		t.Errorf("status after emptying: %+v, %v", st, err)
	}
	if out := nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", "proto", "77"); strings.TrimSpace(out) != "" {
		t.Errorf("routes of proto 77 left: %q", out)
	}
	if out := nettest.MustRun(t, "ip", "-n", ns.Name, "route", "show", "10.80.0.0/16"); !strings.Contains(out, "dev lo") {
		t.Errorf("emptying removed a route the mesh does not own: %q", out)
	}
	if strings.Contains(logs.String(), "MTU") {
		t.Errorf("wireguard-go could not read the MTU: a lookup ran in the wrong namespace")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if _, err := ns.Command("ip", "link", "show", iface).CombinedOutput(); err == nil {
		t.Errorf("%s still exists after Close", iface)
	}
	if _, err := os.Stat(filepath.Join(uapiDir, iface+".sock")); !os.IsNotExist(err) {
		t.Errorf("uapi socket left: %v", err)
	}
	// Every descriptor the mesh opened (TUN, UDP, netlink, UAPI, inotify,
	// the namespace handle) is closed; wireguard-go's goroutines close
	// some on their way out, so allow them a moment.
	deadline := time.Now().Add(2 * time.Second)
	for n := openFDs(t); n > fdsBefore; n = openFDs(t) {
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open after Close, %d before Open", n, fdsBefore)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// TestMeshAppliesRoutingTables drives a mesh the way `edgeproxy run` does:
// the routing store reads pops with the mesh's LoadOptions, and each table
// it publishes goes to Apply.
func TestMeshAppliesRoutingTables(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNS(t, "wga")
	keyFile := filepath.Join(t.TempDir(), "k")
	priv, err := WriteKeyFile(keyFile, false)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	iface := "wga" + hex.EncodeToString(b)
	s := Settings{Interface: iface, PrivateKeyFile: keyFile, ListenPort: 51998, Address: netip.MustParsePrefix("10.50.9.1/16"), PopID: "me"}
	logs := &lockedBuffer{}
	var m *Mesh
	if err := ns.Do(func() (err error) {
		m, err = Open(s, slog.New(slog.NewTextHandler(logs, nil)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Close()
		if t.Failed() {
			t.Logf("mesh log:\n%s", logs.String())
		}
	})
	if addrs := m.HostAddrs(); !slices.Contains(addrs, netip.MustParseAddr("10.50.9.1")) {
		t.Fatalf("HostAddrs = %v, want the overlay address 10.50.9.1 of the mesh's namespace", addrs)
	}

	self := []any{"me", "sa", priv.PublicKey().String(), "", "10.50.9.1", "10.50.9.1/32", 0}
	peer := []any{"peer", "sa", testKey(5).String(), "192.0.2.5:51820", "10.50.5.1", "10.50.5.1/32,10.70.0.0/16", 0}
	greedy := []any{"greedy", "sa", testKey(6).String(), "", "10.50.8.1", "10.50.8.0/21", 0} // holds 10.50.9.1
	steps := []struct {
		name      string
		rows      [][]any
		wantPeers []string
		wantSkip  []string // pops rows the store skips
	}{
		{"a peer is added, this POP's own row is not a peer", [][]any{self, peer}, []string{"peer"}, nil},
		{"a row capturing this host's overlay address is skipped", [][]any{self, peer, greedy}, []string{"peer"}, []string{"greedy"}},
		{"a pops-only change removes the peer", [][]any{self}, nil, nil},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			path := writePops(t, st.rows...)
			tbl, rowErrs, err := routing.LoadTableWith(path, m.LoadOptions())
			if err != nil {
				t.Fatal(err)
			}
			var skipped []string
			for _, re := range rowErrs {
				skipped = append(skipped, re.ID)
				if !strings.Contains(re.Reason, "an address of this host") {
					t.Errorf("row %q skipped for %q, want for covering this host's address", re.ID, re.Reason)
				}
			}
			if !slices.Equal(skipped, st.wantSkip) {
				t.Errorf("skipped rows %v (%v), want %v", skipped, rowErrs, st.wantSkip)
			}
			if err := m.Apply(tbl); err != nil {
				t.Fatal(err)
			}
			ps, err := m.Status()
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, p := range ps {
				got = append(got, p.ID)
			}
			if !slices.Equal(got, st.wantPeers) {
				t.Errorf("peers %v, want %v", got, st.wantPeers)
			}
		})
	}
}
