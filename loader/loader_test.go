package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The Go twins bpf2go generated must match the C layout the maps use.
func TestGeneratedTypesMatchMapSpecs(t *testing.T) {
	spec, err := loadProxy()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		m          string
		key, value any
	}{
		{"sockets", uint64(0), uint64(0)},
		{"pairings", uint64(0), proxyPairing{}},
		{"flows", uint32(0), proxyFlow{}},
		{"backend_bytes", uint32(0), uint64(0)},
		{"verdicts", uint32(0), uint64(0)},
		{"backends", uint32(0), proxyBackendInfo{}},
		{"affinity", proxyClientKey{}, proxyBinding{}},
	} {
		ms := spec.Maps[tc.m]
		if ms == nil {
			t.Fatalf("map %s missing from the object", tc.m)
		}
		if got := binary.Size(tc.key); uint32(got) != ms.KeySize {
			t.Errorf("%s: Go key is %d bytes, map key %d", tc.m, got, ms.KeySize)
		}
		if got := binary.Size(tc.value); uint32(got) != ms.ValueSize {
			t.Errorf("%s: Go value is %d bytes, map value %d", tc.m, got, ms.ValueSize)
		}
	}
	// Maps indexed by socket must hold the same number of entries.
	if a, b, c := spec.Maps["sockets"].MaxEntries, spec.Maps["pairings"].MaxEntries, spec.Maps["flows"].MaxEntries; a != b || b != c {
		t.Errorf("sockets, pairings and flows disagree on size: %d, %d, %d", a, b, c)
	}
	if got := spec.Maps["backends"].MaxEntries; got != MaxBackends {
		t.Errorf("backends holds %d, MaxBackends says %d", got, MaxBackends)
	}
	if got := spec.Maps["backend_bytes"].MaxEntries; got != 2*MaxBackends {
		t.Errorf("backend_bytes holds %d, want two directions of %d backends", got, MaxBackends)
	}
	if got := spec.Maps["affinity"].MaxEntries; got != MaxAffinity {
		t.Errorf("affinity holds %d, MaxAffinity says %d", got, MaxAffinity)
	}
	if got := spec.Maps["verdicts"].MaxEntries; int(got) != len(VerdictReasons) {
		t.Errorf("verdicts holds %d reasons, Go names %d", got, len(VerdictReasons))
	}
}

func requireBPF(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("needs root on Linux to load BPF")
	}
	// As root on a BPF kernel the probe must pass: a failure is a failure.
	if err := Probe(); err != nil {
		t.Fatalf("running as root but: %v", err)
	}
}

func tempPin(t *testing.T) string {
	t.Helper()
	// bpffs refuses dots in names.
	pin := filepath.Join("/sys/fs/bpf", fmt.Sprintf("edgeproxy-loader-test-%d", time.Now().UnixNano()))
	t.Cleanup(func() { os.RemoveAll(pin) })
	return pin
}

func TestOpenPinsLocksAndCloseUnpins(t *testing.T) {
	requireBPF(t)
	pin := tempPin(t)
	s, err := Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"sockets", "pairings", "flows", "backends", "verdicts", "backend_bytes", "affinity"} {
		if _, err := os.Stat(filepath.Join(pin, m)); err != nil {
			t.Errorf("map %s not pinned: %v", m, err)
		}
	}
	if _, err := Open(pin); !errors.Is(err, ErrAlreadyLoaded) {
		t.Fatalf("second Open of a held pin path: %v, want ErrAlreadyLoaded", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"sockets", "pairings", "flows", "backends"} {
		if _, err := os.Stat(filepath.Join(pin, m)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("per-run map %s still pinned after Close", m)
		}
	}
	if _, err := os.Stat(filepath.Join(pin, "affinity")); err != nil {
		t.Errorf("affinity must stay pinned: %v", err)
	}
}

func TestAffinitySurvivesReopen(t *testing.T) {
	requireBPF(t)
	pin := tempPin(t)
	s, err := Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	client := netip.MustParseAddr("192.0.2.7")
	now := time.Unix(1_800_000_000, 0)
	if err := s.Affinity().Bind(client, "eu-fr-1", now); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The mapped form is the same client.
	id, last, ok, err := s.Affinity().Lookup(netip.MustParseAddr("::ffff:192.0.2.7"))
	if err != nil || !ok || id != "eu-fr-1" || !last.Equal(now) {
		t.Fatalf("after reopen: %q %v %v %v, want eu-fr-1 bound at %v", id, last, ok, err, now)
	}
	remaining, removed, err := s.Affinity().Sweep(func(string, time.Time) bool { return false })
	if err != nil || remaining != 0 || removed != 1 {
		t.Fatalf("sweep: %d remaining, %d removed, %v", remaining, removed, err)
	}
}

func socketPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func fdCookie(t *testing.T, c *net.TCPConn) (int, uint64) {
	raw, _ := c.SyscallConn()
	var fd int
	var cookie uint64
	var err error
	raw.Control(func(f uintptr) {
		fd = int(f)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	})
	if err != nil {
		t.Fatal(err)
	}
	return fd, cookie
}

// Pairing puts both sockets and both pairing entries in; unpairing and
// closing leave nothing behind.
func TestPairUnpairLeavesNoEntries(t *testing.T) {
	s := openSockmap(t)
	_, clientSide := socketPair(t)
	backendSide, _ := socketPair(t)
	cfd, ccookie := fdCookie(t, clientSide)
	bfd, bcookie := fdCookie(t, backendSide)
	p := Pair{ClientFD: cfd, BackendFD: bfd, ClientCookie: ccookie, BackendCookie: bcookie, Backend: 3}
	if err := s.Pair(p); err != nil {
		t.Fatal(err)
	}
	if sockets, pairings, err := s.CountEntries(); err != nil || sockets != 2 || pairings != 2 {
		t.Fatalf("after pairing: %d sockets, %d pairings, %v; want 2 and 2", sockets, pairings, err)
	}
	if err := s.Unpair(p); err != nil {
		t.Fatal(err)
	}
	clientSide.Close()
	backendSide.Close()
	if sockets, pairings, err := s.CountEntries(); err != nil || sockets != 0 || pairings != 0 {
		t.Fatalf("after unpair and close: %d sockets, %d pairings, %v; want empty maps", sockets, pairings, err)
	}
}

// Verdicts names every reason, so metrics show zeros from the start.
func TestVerdictsNamesEveryReason(t *testing.T) {
	s := openSockmap(t)
	v, err := s.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range VerdictReasons {
		if _, ok := v[name]; !ok {
			t.Errorf("verdict reason %s missing from %v", name, v)
		}
	}
}

// A backend slot handed to a new backend starts from zero bytes both ways,
// on every CPU, and its neighbours keep theirs.
func TestResetBackendBytesZeroesOneSlot(t *testing.T) {
	s := openSockmap(t)
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	// Seed slots 6, 7 and 8 as the verdict would have: bytes on every CPU.
	seed := func(slot uint32, perCPU uint64) {
		t.Helper()
		values := make([]uint64, cpus)
		for i := range values {
			values[i] = perCPU
		}
		for _, dir := range []uint32{ClientToBackend, BackendToClient} {
			if err := s.objs.BackendBytes.Update(slot*2+dir, values, ebpf.UpdateExist); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, slot := range []uint32{6, 7, 8} {
		seed(slot, 100)
	}
	want := uint64(100 * cpus)
	if in, out, err := s.BackendBytes(7); err != nil || in != want || out != want {
		t.Fatalf("seeded slot 7: %d and %d bytes, %v; want %d each way", in, out, err, want)
	}
	if err := s.ResetBackendBytes(7); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		slot uint32
		want uint64
	}{
		{"the reset slot is empty", 7, 0},
		{"the slot before keeps its bytes", 6, want},
		{"the slot after keeps its bytes", 8, want},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in, out, err := s.BackendBytes(tc.slot)
			if err != nil || in != tc.want || out != tc.want {
				t.Fatalf("slot %d: %d and %d bytes, %v; want %d each way", tc.slot, in, out, err, tc.want)
			}
		})
	}
	if err := s.ResetBackendBytes(MaxBackends); err == nil {
		t.Fatalf("reset of slot %d beyond the map: no error", MaxBackends)
	}
}

// Affinity reads come from the userspace copy, writes reach the map first,
// and a sweep rebuilds the copy from the map: an entry deleted behind the
// proxy's back (bpftool) is forgotten by the next sweep.
func TestAffinityCopyIsWrittenThroughAndRebuiltBySweep(t *testing.T) {
	s := openSockmap(t)
	a := s.Affinity()
	client := netip.MustParseAddr("198.51.100.9")
	now := time.Unix(1_800_000_000, 0)
	if err := a.Bind(client, "us-ny-2", now); err != nil {
		t.Fatal(err)
	}
	var inMap proxyBinding
	if err := a.m.Lookup(clientKey(client), &inMap); err != nil || idString(inMap.BackendId) != "us-ny-2" {
		t.Fatalf("after Bind the map holds %q (%v), want us-ny-2", idString(inMap.BackendId), err)
	}
	if err := a.m.Delete(clientKey(client)); err != nil {
		t.Fatal(err)
	}
	if id, _, ok, _ := a.Lookup(client); !ok || id != "us-ny-2" {
		t.Fatalf("before a sweep the copy answers: got %q %v, want us-ny-2", id, ok)
	}
	remaining, removed, err := a.Sweep(func(string, time.Time) bool { return true })
	if err != nil || remaining != 0 || removed != 0 {
		t.Fatalf("sweep: %d remaining, %d removed, %v; want 0 and 0", remaining, removed, err)
	}
	if id, _, ok, _ := a.Lookup(client); ok {
		t.Fatalf("after a sweep the deleted binding is still answered: %q", id)
	}
	// A binding written into the map by someone else appears after a sweep.
	other := netip.MustParseAddr("203.0.113.4")
	var b proxyBinding
	copy(b.BackendId[:], []int8{'e', 'u', '-', '1'})
	b.LastUsedUnixNs = uint64(now.UnixNano())
	if err := a.m.Update(clientKey(other), &b, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.Sweep(func(string, time.Time) bool { return true }); err != nil {
		t.Fatal(err)
	}
	if id, last, ok, _ := a.Lookup(other); !ok || id != "eu-1" || !last.Equal(now) {
		t.Fatalf("after a sweep: %q %v %v, want eu-1 at %v", id, last, ok, now)
	}
}

// One Unpair deletes the pairings of several connections, and a pair whose
// entries are already gone does not stop the others (the kernel's batch
// delete stops at the first missing key).
func TestUnpairBatchSkipsMissingEntries(t *testing.T) {
	s := openSockmap(t)
	var pairs []Pair
	for i := range 3 {
		_, clientSide := socketPair(t)
		backendSide, _ := socketPair(t)
		cfd, ccookie := fdCookie(t, clientSide)
		bfd, bcookie := fdCookie(t, backendSide)
		p := Pair{ClientFD: cfd, BackendFD: bfd, ClientCookie: ccookie, BackendCookie: bcookie, Backend: uint32(i)}
		if err := s.Pair(p); err != nil {
			t.Fatal(err)
		}
		pairs = append(pairs, p)
	}
	if err := s.Unpair(pairs[1]); err != nil {
		t.Fatal(err)
	}
	if err := s.Unpair(pairs...); err != nil {
		t.Fatalf("unpair with one pair already gone: %v", err)
	}
	if _, pairings, err := s.CountEntries(); err != nil || pairings != 0 {
		t.Fatalf("after unpair: %d pairings, %v; want none", pairings, err)
	}
}

// A pairing left behind by a closed socket names a flow slot that another
// socket may own by now (descriptor numbers are reused). The verdict checks
// the slot's owner and leaves the new owner's count alone.
func TestStalePairingLeavesReusedFlowSlotAlone(t *testing.T) {
	s := openSockmap(t)
	remoteClient, clientSide := socketPair(t)
	backendSide, _ := socketPair(t)
	cfd, ccookie := fdCookie(t, clientSide)
	bfd, bcookie := fdCookie(t, backendSide)
	if err := s.Pair(Pair{ClientFD: cfd, BackendFD: bfd, ClientCookie: ccookie, BackendCookie: bcookie}); err != nil {
		t.Fatal(err)
	}
	// Another socket takes the client's slot, as after close and reuse.
	s.claimFlow(cfd, ccookie+1_000_000)
	before, err := s.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := remoteClient.Write([]byte("stale")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		after, err := s.Verdicts()
		if err != nil {
			t.Fatal(err)
		}
		if after["pass_bad_flow"] > before["pass_bad_flow"] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no pass_bad_flow verdict within 2s: before %v, after %v", before, after)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := atomic.LoadUint64(s.FlowState(cfd)); got != 0 {
		t.Fatalf("the new owner's flow word is %#x, want 0: a stale pairing counted into it", got)
	}
}

// The remote's bare FIN sets the FIN bit of the flow, after the count of
// every byte before it: userspace reads EOF there without a recv.
func TestBareFINSetsFlowFINAfterTheCount(t *testing.T) {
	s := openSockmap(t)
	remoteClient, clientSide := socketPair(t)
	backendSide, _ := socketPair(t)
	cfd, ccookie := fdCookie(t, clientSide)
	bfd, bcookie := fdCookie(t, backendSide)
	if err := s.Pair(Pair{ClientFD: cfd, BackendFD: bfd, ClientCookie: ccookie, BackendCookie: bcookie}); err != nil {
		t.Fatal(err)
	}
	if _, err := remoteClient.Write([]byte("12345")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the bytes and the FIN in two segments
	if err := remoteClient.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		word := atomic.LoadUint64(s.FlowState(cfd))
		if word&FlowFIN != 0 {
			if count := word & FlowCountMask; count != 5 {
				t.Fatalf("FIN bit set with count %d, want 5", count)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("flow word %#x: no FIN bit within 2s of the remote's FIN", word)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A client socket that is no longer established (its remote sent FIN
// before the pairing) cannot enter the sockhash. The failed pairing leaves
// nothing behind, flow slots included: the caller copies such a connection
// in userspace and never unpairs it.
func TestFailedPairingReleasesFlowSlots(t *testing.T) {
	s := openSockmap(t)
	remoteClient, clientSide := socketPair(t)
	backendSide, _ := socketPair(t)
	remoteClient.Close()
	// Reading EOF proves the FIN arrived: the socket is in CLOSE_WAIT.
	clientSide.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := clientSide.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("read after the remote closed: %d bytes, %v; want EOF", n, err)
	}
	cfd, ccookie := fdCookie(t, clientSide)
	bfd, bcookie := fdCookie(t, backendSide)
	err := s.Pair(Pair{ClientFD: cfd, BackendFD: bfd, ClientCookie: ccookie, BackendCookie: bcookie})
	if !errors.Is(err, ErrNotEstablished) || errors.Is(err, ErrClientStaysPaired) {
		t.Fatalf("pairing a half-closed client socket: %v; want ErrNotEstablished without ErrClientStaysPaired", err)
	}
	if sockets, pairings, err := s.CountEntries(); err != nil || sockets != 0 || pairings != 0 {
		t.Fatalf("after the failed pairing: %d sockets, %d pairings, %v; want empty maps", sockets, pairings, err)
	}
	if n, err := CountPinnedFlows(s.PinPath); err != nil || n != 0 {
		t.Fatalf("after the failed pairing: %d flow slots owned, %v; want none", n, err)
	}
}

// openSockmap loads the data plane pinned under a temporary path, closed
// when the test ends; it skips where BPF is unavailable (requireBPF).
func openSockmap(t *testing.T) *Sockmap {
	t.Helper()
	requireBPF(t)
	s, err := Open(tempPin(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
