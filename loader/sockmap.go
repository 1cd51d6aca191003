package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// DefaultPinPath is where the maps live unless EDGEPROXY_BPF_PIN_PATH says
// otherwise.
const DefaultPinPath = "/sys/fs/bpf/edgeproxy"

// FlowArmed is the bit of a flow's state word that makes the verdict
// redirect; FlowFIN says the verdict saw the remote's bare FIN, so the
// count is final; the remaining bits count the bytes the verdict has seen.
const (
	FlowArmed     = uint64(1) << 63
	FlowFIN       = uint64(1) << 62
	FlowCountMask = FlowFIN - 1
)

// Direction of a byte count, as the backend_bytes map stores it.
const (
	ClientToBackend = 0
	BackendToClient = 1
)

// MaxBackends is how many backends the per-backend byte counters hold.
const MaxBackends = 4096

// Verdict reasons, in the order of the verdicts map.
var VerdictReasons = []string{
	proxyVerdictReasonVERDICT_REDIRECTED:     "redirected",
	proxyVerdictReasonVERDICT_PASS_UNPAIRED:  "pass_unpaired",
	proxyVerdictReasonVERDICT_PASS_UNARMED:   "pass_unarmed",
	proxyVerdictReasonVERDICT_PASS_PEER_GONE: "pass_peer_gone",
	proxyVerdictReasonVERDICT_PASS_BAD_FLOW:  "pass_bad_flow",
	proxyVerdictReasonVERDICT_DROP_EMPTY:     "drop_empty_fin",
}

// Pair names the two sockets of one proxied connection. A socket's flow
// slot is its file descriptor number: unique while the socket is open and
// bounded by the open-file limit, so no slot allocator is needed.
type Pair struct {
	ClientFD, BackendFD         int
	ClientCookie, BackendCookie uint64
	Backend                     uint32 // index for the per-backend byte counters
}

// Sockmap is the loaded data plane: the verdict program attached to the
// sockhash, and the maps pinned under PinPath.
type Sockmap struct {
	PinPath  string
	objs     proxyObjects
	flows    []byte // mmap of the flows array
	backends []byte // mmap of the backends array
	slots    int
	lock     *os.File
	affinity *Affinity
	// pinsOwned says the per-run pins are this process's: not yet for a
	// successor whose hand-over is not committed, no longer once this
	// process handed over. Close removes only pins it owns.
	pinsOwned atomic.Bool
}

// perRunMaps hold state that means nothing once this process is gone (its
// sockets are closed); a restart replaces them.
func (o *proxyObjects) perRunMaps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"sockets":       o.Sockets,
		"pairings":      o.Pairings,
		"flows":         o.Flows,
		"backend_bytes": o.BackendBytes,
		"verdicts":      o.Verdicts,
		"backends":      o.Backends,
	}
}

// connectionMaps are the per-run maps keyed by this process's sockets:
// each process of a hand-over has its own, since a flow slot is an fd
// number and a cookie pairing only means something to the process that
// holds both sockets.
var connectionMaps = []string{"sockets", "pairings", "flows", "verdicts"}

// sharedMaps are the per-run maps both processes of a hand-over use at
// once: the backend table with its live counts (so hard limits hold over
// the two processes together) and the byte counters (so totals continue).
var sharedMaps = []string{"backends", "backend_bytes"}

// Open loads the data plane and pins its maps under pinPath. Pins left by a
// process that died (even by SIGKILL) are replaced; a pin path held by a
// live edgeproxy fails with ErrAlreadyLoaded.
func Open(pinPath string) (*Sockmap, error) {
	if err := Probe(); err != nil {
		return nil, err
	}
	if err := ensureBPFFS(filepath.Dir(pinPath)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(pinPath, 0o700); err != nil {
		return nil, fmt.Errorf("create pin path %s: %w", pinPath, err)
	}
	lock, err := os.Open(pinPath)
	if err != nil {
		return nil, fmt.Errorf("open pin path %s: %w", pinPath, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock pin path %s: %w (another edgeproxy holds it: stop it, replace it with edgeproxy upgrade, or set EDGEPROXY_BPF_PIN_PATH)", pinPath, ErrAlreadyLoaded)
		}
		return nil, fmt.Errorf("lock pin path %s: %w", pinPath, err)
	}
	s, err := load(pinPath, false)
	if err != nil {
		lock.Close()
		return nil, err
	}
	s.lock = lock
	return s, nil
}

// OpenHandedOver loads the data plane in a process taking over from a
// running edgeproxy, with the pin-path lock that process passed over its
// control socket. flock(2) locks belong to the open file description, so
// the passed descriptor already holds the lock both processes now share;
// an unrelated process still meets ErrAlreadyLoaded. The backends and
// byte-counter maps (and affinity) are the pinned ones the running process
// uses; a layout that differs from this binary's is ErrIncompatibleMaps
// and nothing is changed. The connection maps are this process's own and
// are pinned only by PinConnectionMaps, once the hand-over is committed:
// until then the pins still show the running process.
func OpenHandedOver(pinPath string, lock *os.File) (*Sockmap, error) {
	if err := Probe(); err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil, fmt.Errorf("lock pin path %s with the handed-over descriptor: %w", pinPath, err)
	}
	s, err := load(pinPath, true)
	if err != nil {
		return nil, err
	}
	s.lock = lock
	return s, nil
}

// ErrIncompatibleMaps says the pinned maps were made by an edgeproxy whose
// map layout differs from this one's.
var ErrIncompatibleMaps = errors.New("pinned maps have another layout than this edgeproxy's")

// LockFile is the open pin directory whose flock guards the pin path: a
// hand-over passes it to the successor.
func (s *Sockmap) LockFile() *os.File { return s.lock }

// HandedOver records that a successor owns the pins from now on: Close
// releases this process's maps but removes no pin.
func (s *Sockmap) HandedOver() { s.pinsOwned.Store(false) }

// PinConnectionMaps replaces the pins of the connection maps with this
// process's, once the predecessor has handed over.
func (s *Sockmap) PinConnectionMaps() error {
	all := s.objs.perRunMaps()
	for _, name := range connectionMaps {
		if err := replacePin(all[name], filepath.Join(s.PinPath, name)); err != nil {
			return err
		}
	}
	s.pinsOwned.Store(true)
	return nil
}

func replacePin(m *ebpf.Map, path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pin %s: %w", path, err)
	}
	if err := m.Pin(path); err != nil {
		return fmt.Errorf("pin %s: %w", path, err)
	}
	return nil
}

// pinnedShared opens the shared maps the running process pinned and
// checks each against this binary's spec.
func pinnedShared(spec *ebpf.CollectionSpec, pinPath string) (map[string]*ebpf.Map, error) {
	out := map[string]*ebpf.Map{}
	fail := func(err error) (map[string]*ebpf.Map, error) {
		for _, m := range out {
			m.Close()
		}
		return nil, err
	}
	for _, name := range sharedMaps {
		path := filepath.Join(pinPath, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return fail(fmt.Errorf("open pinned %s map %s of the running edgeproxy: %w", name, path, err))
		}
		out[name] = m
		want := spec.Maps[name]
		if os.Getenv(testSkewMapsEnv) != "" {
			want = want.Copy()
			want.ValueSize += 8
		}
		if err := sameLayout(m, want, path); err != nil {
			return fail(err)
		}
	}
	return out, nil
}

// testSkewMapsEnv, set in a test, makes this binary expect shared maps with
// a larger value than the pinned ones: how an integration test plays a new
// release whose map layout changed, without building one.
const testSkewMapsEnv = "EDGEPROXY_TEST_SKEW_MAPS"

// sameLayout compares a pinned map with the spec this binary would create.
func sameLayout(m *ebpf.Map, want *ebpf.MapSpec, path string) error {
	info, err := m.Info()
	if err != nil {
		return fmt.Errorf("inspect pinned map %s: %w", path, err)
	}
	if info.Type != want.Type || info.KeySize != want.KeySize || info.ValueSize != want.ValueSize || info.MaxEntries != want.MaxEntries || info.Flags != want.Flags {
		return fmt.Errorf("pinned map %s is %s key %d value %d entries %d flags %#x, this edgeproxy needs %s key %d value %d entries %d flags %#x: %w",
			path, info.Type, info.KeySize, info.ValueSize, info.MaxEntries, info.Flags, want.Type, want.KeySize, want.ValueSize, want.MaxEntries, want.Flags, ErrIncompatibleMaps)
	}
	return nil
}

func load(pinPath string, handover bool) (*Sockmap, error) {
	spec, err := loadProxy()
	if err != nil {
		return nil, fmt.Errorf("load BPF spec: %w", err)
	}
	// A socket's flow slot is its fd, so every map indexed by socket must
	// hold as many entries as the process can have descriptors.
	slots := socketSlots()
	for _, name := range []string{"sockets", "pairings", "flows"} {
		spec.Maps[name].MaxEntries = uint32(slots)
	}
	affinity, err := reusableAffinity(spec, pinPath)
	if err != nil {
		return nil, err
	}
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{}}
	if affinity != nil {
		opts.MapReplacements["affinity"] = affinity
		defer affinity.Close()
	}
	if handover {
		if affinity == nil {
			return nil, fmt.Errorf("open pinned affinity map of the running edgeproxy under %s: missing (%w)", pinPath, ErrIncompatibleMaps)
		}
		shared, err := pinnedShared(spec, pinPath)
		if err != nil {
			return nil, err
		}
		for name, m := range shared {
			opts.MapReplacements[name] = m
			defer m.Close()
		}
	}
	var objs proxyObjects
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load BPF objects: %+v", verr)
		}
		return nil, fmt.Errorf("load BPF objects: %w", err)
	}
	s := &Sockmap{PinPath: pinPath, objs: objs, slots: slots}
	fail := func(err error) (*Sockmap, error) {
		s.closeObjects()
		return nil, err
	}
	if s.affinity, err = openAffinity(objs.Affinity); err != nil {
		return fail(err)
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  objs.Sockets.FD(),
		Program: objs.SpliceVerdict,
		Attach:  ebpf.AttachSkSKBStreamVerdict,
	}); err != nil {
		return fail(fmt.Errorf("attach stream verdict to sockhash: %w", err))
	}
	size := pageAlign(slots * int(unsafe.Sizeof(proxyFlow{})))
	mem, err := unix.Mmap(objs.Flows.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail(fmt.Errorf("mmap flows map: %w", err))
	}
	s.flows = mem
	size = pageAlign(MaxBackends * int(unsafe.Sizeof(proxyBackendInfo{})))
	if s.backends, err = unix.Mmap(objs.Backends.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return fail(fmt.Errorf("mmap backends map: %w", err))
	}
	if affinity == nil {
		path := filepath.Join(pinPath, "affinity")
		if err := objs.Affinity.Pin(path); err != nil {
			return fail(fmt.Errorf("pin %s: %w", path, err))
		}
	}
	if handover {
		return s, nil // shared maps keep their pins; connection maps wait for the commit
	}
	for name, m := range objs.perRunMaps() {
		if err := replacePin(m, filepath.Join(pinPath, name)); err != nil {
			return fail(err)
		}
	}
	s.pinsOwned.Store(true)
	return s, nil
}

func socketSlots() int {
	slots := 65536
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err == nil && lim.Max != unix.RLIM_INFINITY && int(lim.Max) > slots {
		slots = int(lim.Max)
	}
	return slots
}

func pageAlign(n int) int {
	page := os.Getpagesize()
	return (n + page - 1) / page * page
}

func (s *Sockmap) closeObjects() {
	for _, mem := range []*[]byte{&s.flows, &s.backends} {
		if *mem != nil {
			_ = unix.Munmap(*mem)
			*mem = nil
		}
	}
	s.objs.Close()
}

// Close unpins the per-run maps and releases the program; the affinity map
// stays pinned for the next process. Sockets still paired keep their
// splice until they close.
func (s *Sockmap) Close() error {
	var errs []error
	// By path, not Map.Unpin: a map taken over from a predecessor's pin
	// does not know its pin path.
	for name := range s.objs.perRunMaps() {
		if !s.pinsOwned.Load() {
			break // the successor's pins, or the predecessor's (an aborted hand-over)
		}
		path := filepath.Join(s.PinPath, name)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", name, err))
		}
	}
	s.closeObjects()
	if s.lock != nil {
		s.lock.Close()
	}
	return errors.Join(errs...)
}

func (s *Sockmap) flow(fd int) *proxyFlow {
	return (*proxyFlow)(unsafe.Pointer(&s.flows[fd*int(unsafe.Sizeof(proxyFlow{}))]))
}

// FlowState is the state word of the flow whose slot is fd, shared with
// the verdict program through mmap: use atomic operations only.
func (s *Sockmap) FlowState(fd int) *uint64 { return &s.flow(fd).State }

// claimFlow gives the slot to the socket with this cookie, count zero and
// unarmed. The cookie goes in first: a pairing left by the slot's previous
// socket no longer matches it, so the verdict ignores that pairing.
func (s *Sockmap) claimFlow(fd int, cookie uint64) {
	f := s.flow(fd)
	atomic.StoreUint64(&f.Cookie, cookie)
	atomic.StoreUint64(&f.State, 0)
}

// releaseFlow empties the slot if the socket with this cookie still owns
// it, so a closed connection leaves no flow behind (an operator or a test
// counting flows in use sees only live ones); a slot already claimed by a
// newer socket with the same fd is left alone.
func (s *Sockmap) releaseFlow(fd int, cookie uint64) {
	if fd < 0 || fd >= s.slots {
		return
	}
	f := s.flow(fd)
	if atomic.CompareAndSwapUint64(&f.Cookie, cookie, 0) {
		atomic.StoreUint64(&f.State, 0)
	}
}

// releaseFlows gives back the flow slots of both sockets of p.
func (s *Sockmap) releaseFlows(p Pair) {
	s.releaseFlow(p.ClientFD, p.ClientCookie)
	s.releaseFlow(p.BackendFD, p.BackendCookie)
}

// Pair connects the two sockets through the kernel. Both directions start
// unarmed: the verdict counts their bytes and leaves them in each socket's
// own queue until userspace has forwarded what came first and arms them.
// It costs three bpf() calls: the pairing entries in one batch, then each
// socket into the sockhash (the kernel has no batch update for a sockhash:
// sock_hash_ops sets no map_update_batch, so BPF_MAP_UPDATE_BATCH fails
// with ENOTSUPP).
func (s *Sockmap) Pair(p Pair) error {
	if p.ClientFD >= s.slots || p.BackendFD >= s.slots {
		return fmt.Errorf("pair fds %d and %d: beyond %d flow slots", p.ClientFD, p.BackendFD, s.slots)
	}
	s.claimFlow(p.ClientFD, p.ClientCookie)
	s.claimFlow(p.BackendFD, p.BackendCookie)
	keys := []uint64{p.ClientCookie, p.BackendCookie}
	values := []proxyPairing{
		{PeerCookie: p.BackendCookie, Flow: uint32(p.ClientFD), Counter: p.Backend*2 + ClientToBackend},
		{PeerCookie: p.ClientCookie, Flow: uint32(p.BackendFD), Counter: p.Backend*2 + BackendToClient},
	}
	if _, err := s.objs.Pairings.BatchUpdate(keys, values, nil); err != nil {
		s.releaseFlows(p)
		return fmt.Errorf("write pairings: %w", err)
	}
	if err := s.objs.Sockets.Update(p.ClientCookie, uint64(p.ClientFD), ebpf.UpdateAny); err != nil {
		s.abandonPair(p)
		return fmt.Errorf("insert client socket into sockhash: %w", establishedErr(err))
	}
	if err := s.objs.Sockets.Update(p.BackendCookie, uint64(p.BackendFD), ebpf.UpdateAny); err != nil {
		// The client socket stays in: taking it out would drop the bytes
		// the verdict already passed to its queue. Unarmed, it behaves as
		// a plain socket whose bytes userspace reads.
		return fmt.Errorf("insert backend socket into sockhash: %w (%w)", establishedErr(err), ErrClientStaysPaired)
	}
	return nil
}

func establishedErr(err error) error {
	if errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("%w: %w", ErrNotEstablished, err)
	}
	return err
}

// Unpair removes the pairing entries of every pair given, in one bpf()
// call whatever their number. The sockets leave the sockhash by
// themselves when they close, so the proxy may close them first and
// unpair a batch later: a stale pairing is inert (its cookie belongs to a
// closed socket, and the flow slot it names checks its owner's cookie).
// Every pair given must hold both its entries.
func (s *Sockmap) Unpair(pairs ...Pair) error {
	keys := make([]uint64, 0, 2*len(pairs))
	for _, p := range pairs {
		keys = append(keys, p.ClientCookie, p.BackendCookie)
		s.releaseFlows(p)
	}
	for len(keys) > 0 {
		n, err := s.objs.Pairings.BatchDelete(keys, nil)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, ebpf.ErrKeyNotExist) && n < len(keys):
			// The kernel stops at a missing key (generic_map_delete_batch):
			// skip it and go on with the rest.
			keys = keys[n+1:]
		default:
			return fmt.Errorf("delete %d pairings: %w", len(keys)/2, err)
		}
	}
	return nil
}

// abandonPair undoes a pairing that failed before its client socket
// entered the sockhash: the caller will not unpair it, so neither its
// pairing entries nor its flow slots may stay behind once both sockets
// close.
func (s *Sockmap) abandonPair(p Pair) error {
	s.releaseFlows(p)
	if _, err := s.objs.Pairings.BatchDelete([]uint64{p.ClientCookie, p.BackendCookie}, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete pairings: %w", err)
	}
	return nil
}

// Verdicts reads the verdict counters, summed over CPUs: one lookup per
// reason in a per-CPU array, whatever the number of connections, so a
// metrics scrape may call it.
func (s *Sockmap) Verdicts() (map[string]uint64, error) {
	verdicts := make(map[string]uint64, len(VerdictReasons))
	var perCPU []uint64
	for i, name := range VerdictReasons {
		if err := s.objs.Verdicts.Lookup(uint32(i), &perCPU); err != nil {
			return verdicts, fmt.Errorf("read verdict counter %s: %w", name, err)
		}
		verdicts[name] = sum(perCPU)
	}
	return verdicts, nil
}

// CountEntries walks the sockhash and the pairings map and counts their
// entries. It costs one bpf() call per entry: for tests and tools, never
// for a scrape (the proxy counts its pairs in userspace).
func (s *Sockmap) CountEntries() (sockets, pairings int, err error) {
	if sockets, err = countKeys(s.objs.Sockets); err != nil {
		return 0, 0, fmt.Errorf("count sockhash entries: %w", err)
	}
	if pairings, err = countKeys(s.objs.Pairings); err != nil {
		return 0, 0, fmt.Errorf("count pairing entries: %w", err)
	}
	return sockets, pairings, nil
}

// BackendBytes returns the bytes redirected for backend index i, each way.
func (s *Sockmap) BackendBytes(i uint32) (toBackend, toClient uint64, err error) {
	var perCPU []uint64
	if err := s.objs.BackendBytes.Lookup(i*2+ClientToBackend, &perCPU); err != nil {
		return 0, 0, fmt.Errorf("read bytes of backend %d: %w", i, err)
	}
	toBackend = sum(perCPU)
	if err := s.objs.BackendBytes.Lookup(i*2+BackendToClient, &perCPU); err != nil {
		return 0, 0, fmt.Errorf("read bytes of backend %d: %w", i, err)
	}
	return toBackend, sum(perCPU), nil
}

// ResetBackendBytes zeroes the byte counters of backend slot index, both
// directions and every CPU, so a slot given to a new backend starts from
// nothing instead of inheriting the bytes of the one it replaces.
func (s *Sockmap) ResetBackendBytes(index uint32) error {
	if index >= MaxBackends {
		return fmt.Errorf("reset bytes of backend %d: beyond %d backend slots", index, MaxBackends)
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("reset bytes of backend %d: count possible CPUs: %w", index, err)
	}
	zeros := make([]uint64, cpus)
	for _, dir := range []uint32{ClientToBackend, BackendToClient} {
		if err := s.objs.BackendBytes.Update(index*2+dir, zeros, ebpf.UpdateExist); err != nil {
			return fmt.Errorf("reset bytes of backend %d direction %d: %w", index, dir, err)
		}
	}
	return nil
}

func sum(values []uint64) uint64 {
	var total uint64
	for _, v := range values {
		total += v
	}
	return total
}

func countKeys(m *ebpf.Map) (int, error) {
	var key, next uint64
	n := 0
	err := m.NextKey(nil, &next)
	for err == nil {
		n++
		key = next
		err = m.NextKey(key, &next)
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return n, nil
	}
	return n, err
}

// CountPinned opens the maps pinned under pinPath and counts sockhash and
// pairing entries; tests and `edgeproxy status` use it from outside.
func CountPinned(pinPath string) (sockets, pairings int, err error) {
	for _, c := range []struct {
		name string
		n    *int
	}{{"sockets", &sockets}, {"pairings", &pairings}} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, c.name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return 0, 0, fmt.Errorf("open pinned map %s: %w", c.name, err)
		}
		*c.n, err = countKeys(m)
		m.Close()
		if err != nil {
			return 0, 0, fmt.Errorf("count %s entries: %w", c.name, err)
		}
	}
	return sockets, pairings, nil
}

// CountPinnedFlows counts the flow slots owned by a socket (cookie set) in
// the flows map pinned under pinPath: with no connection open it is zero.
func CountPinnedFlows(pinPath string) (int, error) {
	path := filepath.Join(pinPath, "flows")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return 0, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	defer m.Close()
	size := pageAlign(int(m.MaxEntries()) * int(unsafe.Sizeof(proxyFlow{})))
	mem, err := unix.Mmap(m.FD(), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("mmap %s: %w", path, err)
	}
	defer unix.Munmap(mem)
	n := 0
	for i := 0; i < int(m.MaxEntries()); i++ {
		f := (*proxyFlow)(unsafe.Pointer(&mem[i*int(unsafe.Sizeof(proxyFlow{}))]))
		if atomic.LoadUint64(&f.Cookie) != 0 {
			n++
		}
	}
	return n, nil
}

// ensureBPFFS mounts bpffs at dir when nothing is mounted there, as Cilium
// does on minimal hosts.
func ensureBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	// The pin path may sit below the mount point (e.g. /sys/fs/bpf/x/y).
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		if err := unix.Statfs(d, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
			return nil
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpffs is not mounted at %s and mounting it failed: %w (mount it with: mount -t bpf bpf %s)", dir, err, dir)
	}
	return nil
}
