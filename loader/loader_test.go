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
	requireBPF(t)
	s, err := Open(tempPin(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
	requireBPF(t)
	s, err := Open(tempPin(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
	requireBPF(t)
	s, err := Open(tempPin(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
