package loader

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// dupLock is the pin lock as a hand-over passes it: another descriptor
// of the same open file.
func dupLock(t *testing.T, s *Sockmap) *os.File {
	t.Helper()
	fd, err := unix.Dup(int(s.LockFile().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), "lock")
}

// A successor opened with the passed lock shares the backends map (slots
// and live counts) with the running process; an unrelated Open is still
// refused; pins move to the successor only when it pins them, and the
// process that handed over removes none.
func TestOpenHandedOverSharesBackendsAndLock(t *testing.T) {
	requireBPF(t)
	pin := tempPin(t)
	old, err := Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.SetBackend(7, BackendInfo{ID: "b7", HardLimit: 2}); err != nil {
		t.Fatal(err)
	}
	if !old.ReserveActive(7, 2) {
		t.Fatal("first reservation refused")
	}
	next, err := OpenHandedOver(pin, dupLock(t, old))
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	byID, _ := next.BackendSlots()
	if byID["b7"] != 7 {
		t.Fatalf("successor sees slots %v, want b7 at 7", byID)
	}
	if !next.ReserveActive(7, 2) {
		t.Fatal("second reservation (one in each process) refused")
	}
	if old.ReserveActive(7, 2) || next.ReserveActive(7, 2) {
		t.Fatal("a third reservation passed a hard limit of 2 held over both processes")
	}
	old.ReleaseActive(7)
	if got := next.ActiveOf(7); got != 1 {
		t.Fatalf("successor counts %d after the old process released one, want 1", got)
	}
	if _, err := Open(pin); !errors.Is(err, ErrAlreadyLoaded) {
		t.Fatalf("unrelated Open during a hand-over: %v, want ErrAlreadyLoaded", err)
	}
	// Until the commit the pins still show the old process's maps.
	oldSockets, err := ebpf.LoadPinnedMap(filepath.Join(pin, "sockets"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer oldSockets.Close()
	if pinned, own := mapID(t, oldSockets), mapID(t, old.objs.Sockets); pinned != own {
		t.Fatalf("sockets pin replaced before the commit: map %d, the old process has %d", pinned, own)
	}
	old.HandedOver()
	if err := next.PinConnectionMaps(); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"sockets", "pairings", "flows", "backends", "backend_bytes", "verdicts"} {
		if _, err := os.Stat(filepath.Join(pin, m)); err != nil {
			t.Errorf("%s unpinned by the process that handed over: %v", m, err)
		}
	}
	if err := next.Close(); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"sockets", "pairings", "flows", "backends", "backend_bytes", "verdicts"} {
		if _, err := os.Stat(filepath.Join(pin, m)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still pinned after the last process closed", m)
		}
	}
}

// A successor whose map layout differs is refused and changes nothing.
func TestOpenHandedOverRefusesAnotherLayout(t *testing.T) {
	requireBPF(t)
	pin := tempPin(t)
	old, err := Open(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	t.Setenv(testSkewMapsEnv, "1")
	if _, err := OpenHandedOver(pin, dupLock(t, old)); !errors.Is(err, ErrIncompatibleMaps) {
		t.Fatalf("successor with another layout: %v, want ErrIncompatibleMaps", err)
	}
	if err := old.Close(); err != nil {
		t.Fatalf("old process closing after a refused hand-over: %v", err)
	}
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("kernel reports no map id")
	}
	return id
}
