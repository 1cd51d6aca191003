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
	st, err := s.Stats()
	if err != nil || st.Sockets != 2 || st.Pairings != 2 {
		t.Fatalf("after pairing: %+v %v, want 2 sockets and 2 pairings", st, err)
	}
	if err := s.Unpair(p); err != nil {
		t.Fatal(err)
	}
	clientSide.Close()
	backendSide.Close()
	st, err = s.Stats()
	if err != nil || st.Sockets != 0 || st.Pairings != 0 {
		t.Fatalf("after unpair and close: %+v %v, want empty maps", st, err)
	}
}
