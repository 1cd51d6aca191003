//go:build linux

package integration

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/overlay"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// The fleet tests' addresses: etcd (etcdIP) and the backends (coreIP)
// live in a "core" namespace, on its loopback; each POP reaches both over
// its own veth. Two addresses, so a POP can lose etcd and keep its
// backends.
const (
	etcdIP      = "10.88.0.1"
	coreIP      = "10.88.0.2"
	etcdURL     = "http://" + etcdIP + ":2379"
	fleetPrefix = "/edgeproxy/"
)

// fleetPOP is one POP namespace linked to the core.
type fleetPOP struct {
	ns     *nettest.NS
	proxy  *proxyProc
	linkIP string // the POP's address on its link to the core
}

// fleet is a core with etcd and greeting backends, and POPs.
type fleet struct {
	core *nettest.NS
	etcd *etcdServer
	pops []*fleetPOP
}

// newFleet builds the core (etcd started) and n POP namespaces linked to
// it; POP i is 10.88.(i+1).2, the core's end 10.88.(i+1).1.
func newFleet(t *testing.T, n int) *fleet {
	t.Helper()
	nettest.RequireRoot(t)
	f := &fleet{core: nettest.NewNS(t, "core")}
	nettest.MustRun(t, "ip", "-n", f.core.Name, "addr", "add", etcdIP+"/32", "dev", "lo")
	nettest.MustRun(t, "ip", "-n", f.core.Name, "addr", "add", coreIP+"/32", "dev", "lo")
	for i := range n {
		ns := nettest.NewNS(t, "pop"+strconv.Itoa(i))
		coreEnd, popEnd := fmt.Sprintf("10.88.%d.1", i+1), fmt.Sprintf("10.88.%d.2", i+1)
		nettest.Link(t, f.core, coreEnd+"/24", ns, popEnd+"/24")
		nettest.MustRun(t, "ip", "-n", ns.Name, "route", "add", "10.88.0.0/24", "via", coreEnd)
		f.pops = append(f.pops, &fleetPOP{ns: ns, linkIP: popEnd})
	}
	f.etcd = startEtcd(t, f.core)
	return f
}

// etcdServer is Debian's etcd (package etcd-server) run by the test in
// the core namespace, its data on tmpfs: this machine's disk takes
// seconds per fsync when busy, which would time out raft.
type etcdServer struct {
	ns      *nettest.NS
	dataDir string
	cmd     *exec.Cmd
	done    chan error
	logs    *syncBuffer
}

func startEtcd(t *testing.T, ns *nettest.NS) *etcdServer {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		t.Fatalf("etcd is not installed (%v): the fleet tests need Debian's etcd-server (make deps installs it)", err)
	}
	base := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "edgeproxy-etcd-")
	if err != nil {
		t.Fatal(err)
	}
	e := &etcdServer{ns: ns, dataDir: dir, logs: &syncBuffer{}}
	t.Cleanup(func() {
		e.stop(t)
		os.RemoveAll(dir)
		if t.Failed() {
			t.Logf("etcd log:\n%s", e.logs.tail(32<<10))
		}
	})
	e.start(t)
	return e
}

func (e *etcdServer) start(t *testing.T) {
	t.Helper()
	peer := "http://127.0.0.1:2380"
	e.cmd = e.ns.Command("etcd", "--name", "core", "--data-dir", e.dataDir,
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "core="+peer,
		// A restarted single member elects itself after one election
		// timeout: keep that short so the test waits for the POPs, not
		// for raft.
		"--heartbeat-interval", "50", "--election-timeout", "500")
	e.cmd.Stdout, e.cmd.Stderr = e.logs, e.logs
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	e.done = make(chan error, 1)
	go func() { e.done <- e.cmd.Wait() }()
	cli := e.client(t)
	defer cli.Close()
	waitUntil(t, 30*time.Second, "etcd answers", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := cli.Get(ctx, "probe")
		return err == nil, fmt.Sprint(err)
	})
}

// stop ends etcd with SIGTERM (SIGKILL after 10 s).
func (e *etcdServer) stop(t *testing.T) {
	if e.cmd == nil {
		return
	}
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(10 * time.Second):
		t.Errorf("etcd ignored SIGTERM for 10s; killing it")
		_ = e.cmd.Process.Kill()
		<-e.done
	}
	e.cmd = nil
}

// kill ends etcd at once, as a crash would.
func (e *etcdServer) kill() {
	_ = e.cmd.Process.Kill()
	<-e.done
	e.cmd = nil
}

// client is a Go client of etcd from the test process, dialling from
// inside the core namespace.
func (e *etcdServer) client(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{etcdURL},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return nettest.Dial(e.ns, addr, 2*time.Second)
		})},
	})
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	return cli
}

// ctl runs `edgeproxy ctl ARGS` inside ns against the fleet's etcd and
// returns its output; a failure fails the test unless wantFail.
func ctl(t *testing.T, ns *nettest.NS, wantFail bool, args ...string) string {
	t.Helper()
	cmd := ns.Command(binary, append([]string{"ctl"}, args...)...)
	cmd.Env = append(os.Environ(), "EDGEPROXY_ETCD_ENDPOINTS="+etcdURL)
	out, err := cmd.CombinedOutput()
	if (err != nil) != wantFail {
		t.Fatalf("edgeproxy ctl %s: %v (want failure %v)\n%s", strings.Join(args, " "), err, wantFail, out)
	}
	return string(out)
}

// revisionOf reads "... at revision N" from a ctl line.
func revisionOf(t *testing.T, out string) int64 {
	t.Helper()
	i := strings.LastIndex(out, "at revision ")
	if i < 0 {
		t.Fatalf("no revision in %q", out)
	}
	n, err := strconv.ParseInt(strings.Fields(out[i+len("at revision "):])[0], 10, 64)
	if err != nil {
		t.Fatalf("revision in %q: %v", out, err)
	}
	return n
}

// fleetStatus is the part of /status the fleet tests read.
type fleetStatus struct {
	Etcd *struct {
		Connected bool      `json:"connected"`
		Revision  int64     `json:"revision"`
		LastSync  time.Time `json:"last_sync"`
		LastError string    `json:"last_error"`
	} `json:"etcd"`
	Backends []adminBackend `json:"backends"`
}

func (s fleetStatus) ids() []string {
	var ids []string
	for _, b := range s.Backends {
		ids = append(ids, b.ID)
	}
	slices.Sort(ids)
	return ids
}

func (s fleetStatus) String() string {
	if s.Etcd == nil {
		return fmt.Sprintf("no etcd in /status; backends %v", s.ids())
	}
	return fmt.Sprintf("etcd connected=%v revision=%d last_sync=%s last_error=%q; backends %v",
		s.Etcd.Connected, s.Etcd.Revision, s.Etcd.LastSync.Format(time.RFC3339Nano), s.Etcd.LastError, s.ids())
}

// statusOf reads /status of the POP's proxy; an unreachable admin server
// is a zero status, for polls.
func statusOf(p *fleetPOP) (fleetStatus, error) {
	var st fleetStatus
	code, body, err := adminGet(p.ns, "/status")
	if err != nil {
		return st, err
	}
	if code != 200 {
		return st, fmt.Errorf("GET /status: HTTP %d", code)
	}
	err = json.Unmarshal(body, &st)
	return st, err
}

// waitFor polls every POP's /status until cond holds for all of them.
func waitFor(t *testing.T, within time.Duration, what string, pops []*fleetPOP, cond func(fleetStatus) bool) time.Duration {
	t.Helper()
	return waitUntil(t, within, what, func() (bool, string) {
		var why []string
		ok := true
		for i, p := range pops {
			st, err := statusOf(p)
			if err != nil || !cond(st) {
				ok = false
				why = append(why, fmt.Sprintf("POP %d: %v %v", i, st, err))
			}
		}
		return ok, strings.Join(why, "; ")
	})
}

// startPOP runs edgeproxy in the POP following the fleet's etcd, with the
// given local rows (which the first full load must replace).
func (f *fleet) startPOP(t *testing.T, p *fleetPOP, plane string, local []backendRow, env ...string) {
	t.Helper()
	env = append([]string{adminEnv, "EDGEPROXY_ETCD_ENDPOINTS=" + etcdURL,
		// The bound on a change is the follower's, not the poll's: a
		// minute here would show if it were the poll.
		"EDGEPROXY_DB_RELOAD_SECS=60", "EDGEPROXY_HEALTH_INTERVAL_SECS=0", "EDGEPROXY_WG_INTERFACE="}, env...)
	p.proxy = startProxy(t, p.ns, plane, local, env...)
}

// greet dials the POP's own proxy and returns the backend that greeted.
func greet(t *testing.T, p *fleetPOP) string {
	t.Helper()
	a := tryGreeting(p.ns, "", net.JoinHostPort(p.linkIP, "8080"), 3*time.Second)
	if a.conn != nil {
		a.conn.Close()
	}
	if a.out != greeted {
		t.Fatalf("through the proxy of %s: %v", p.ns.Name, a)
	}
	return a.id
}

func serveBackends(t *testing.T, core *nettest.NS, ids ...string) {
	for i, id := range ids {
		nettest.Serve(t, core, net.JoinHostPort(coreIP, strconv.Itoa(9001+i)), nettest.Greeter(id))
	}
}

// TestEtcdCtlChangeReachesTwoPOPs: two POP processes (sockmap and splice)
// follow etcd; the first full load removes a local row etcd does not
// hold; a ctl change reaches both POPs' routing within 1 s although their
// reload interval is a minute; a value that is not a valid row is refused
// by ctl, and written past it (by hand) is skipped with its key and reason
// and never reaches the table.
func TestEtcdCtlChangeReachesTwoPOPs(t *testing.T) {
	f := newFleet(t, 2)
	serveBackends(t, f.core, "be-1", "be-2", "be-3")
	a, b := f.pops[0], f.pops[1]
	ctl(t, a.ns, false, "backend", "put", "be-1", "--wg-ip", coreIP, "--port", "9001", "--region", "sa", "--country", "BR")

	stale := backendRow{ID: "stale-local", Region: "sa", Country: "BR", Addr: coreIP, Port: 9002, Healthy: true, Weight: 1, Soft: 10}
	f.startPOP(t, a, "sockmap", []backendRow{stale})
	f.startPOP(t, b, "splice", nil)
	both := f.pops
	waitFor(t, 2*time.Second, "both POPs hold exactly be-1 (the local stale row removed)", both, func(s fleetStatus) bool {
		return s.Etcd != nil && s.Etcd.Connected && slices.Equal(s.ids(), []string{"be-1"})
	})
	for _, p := range both {
		if got := greet(t, p); got != "be-1" {
			t.Fatalf("%s routed to %s, want be-1", p.ns.Name, got)
		}
	}

	// One ctl change: be-2 in, be-1 out. Timed from when ctl returns.
	ctl(t, a.ns, false, "backend", "put", "be-2", "--wg-ip", coreIP, "--port", "9002", "--region", "sa")
	out := ctl(t, a.ns, false, "backend", "delete", "be-1")
	rev := revisionOf(t, out)
	took := waitFor(t, time.Second, "the ctl change reaches both POPs' routing", both, func(s fleetStatus) bool {
		return s.Etcd != nil && s.Etcd.Revision >= rev && slices.Equal(s.ids(), []string{"be-2"})
	})
	t.Logf("a ctl change reached both POPs in %v", took)
	for _, p := range both {
		if got := greet(t, p); got != "be-2" {
			t.Fatalf("%s routed to %s after the change, want be-2", p.ns.Name, got)
		}
	}
	if out := ctl(t, a.ns, false, "backend", "delete", "be-1"); !strings.Contains(out, "nothing deleted") {
		t.Fatalf("deleting a missing backend: %q, want it to say nothing was deleted", out)
	}

	// ctl refuses an invalid row before writing anything.
	before := etcdRevision(t, f.etcd)
	out = ctl(t, a.ns, true, "backend", "put", "be-bad", "--wg-ip", coreIP, "--port", "70000")
	if !strings.Contains(out, "port") || !strings.Contains(out, "1-65535") {
		t.Fatalf("ctl's refusal does not name the column and rule: %q", out)
	}
	if after := etcdRevision(t, f.etcd); after != before {
		t.Fatalf("a refused put wrote to etcd: revision %d -> %d", before, after)
	}

	// Written by hand past ctl: skipped by both POPs, with key and reason.
	cli := f.etcd.client(t)
	defer cli.Close()
	ctx := withTimeout(t, 10*time.Second)
	badKey := fleetPrefix + "backends/be-bad"
	if _, err := cli.Put(ctx, badKey, `{"wg_ip":"`+coreIP+`","port":70000}`); err != nil {
		t.Fatal(err)
	}
	out = ctl(t, a.ns, false, "backend", "put", "be-3", "--wg-ip", coreIP, "--port", "9003")
	rev = revisionOf(t, out)
	waitFor(t, time.Second, "be-3 reaches both POPs, be-bad does not", both, func(s fleetStatus) bool {
		return s.Etcd.Revision >= rev && slices.Equal(s.ids(), []string{"be-2", "be-3"})
	})
	for _, p := range both {
		m := scrape(t, p.ns)
		if v, _ := m.get(`edgeproxy_etcd_skipped_values_total{table="backends"}`); v < 1 {
			t.Fatalf("%s: skipped values metric %v, want >= 1", p.ns.Name, v)
		}
		logs := p.proxy.logs.String()
		if !strings.Contains(logs, badKey) || !strings.Contains(logs, "must be 1-65535") {
			t.Fatalf("%s does not log the skipped key and reason:\n%s", p.ns.Name, logs)
		}
	}
	// `edgeproxy status` prints the follower's line.
	st := a.ns.Command(binary, "status", "--admin", adminAddr)
	text, err := st.CombinedOutput()
	if err != nil || !strings.Contains(string(text), "etcd "+etcdURL) || !strings.Contains(string(text), "connected, revision") {
		t.Fatalf("edgeproxy status: %v\n%s", err, text)
	}
}

func etcdRevision(t *testing.T, e *etcdServer) int64 {
	t.Helper()
	cli := e.client(t)
	defer cli.Close()
	resp, err := cli.Get(withTimeout(t, 5*time.Second), "probe")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// TestEtcdOutagePartitionAndCompaction: with etcd killed both POPs keep
// routing on their table and report it; after it returns they follow
// changes again. A POP cut off while keys change resumes its watch from
// the last revision it applied; one cut off while the history is
// compacted does a full load that drops the key deleted meanwhile, and
// ends up with exactly what etcd holds.
func TestEtcdOutagePartitionAndCompaction(t *testing.T) {
	f := newFleet(t, 2)
	serveBackends(t, f.core, "be-1", "be-2", "be-3", "be-4")
	a, b := f.pops[0], f.pops[1]
	for i := 1; i <= 2; i++ {
		ctl(t, a.ns, false, "backend", "put", fmt.Sprintf("be-%d", i), "--wg-ip", coreIP, "--port", strconv.Itoa(9000+i), "--weight", "1")
	}
	f.startPOP(t, a, "sockmap", nil)
	f.startPOP(t, b, "splice", nil)
	both := f.pops
	waitFor(t, 2*time.Second, "both POPs follow etcd", both, func(s fleetStatus) bool {
		return s.Etcd != nil && s.Etcd.Connected && slices.Equal(s.ids(), []string{"be-1", "be-2"})
	})

	// etcd down: both POPs say so, keep their table and keep routing.
	f.etcd.kill()
	waitFor(t, 10*time.Second, "both POPs report etcd disconnected", both, func(s fleetStatus) bool {
		return !s.Etcd.Connected && slices.Equal(s.ids(), []string{"be-1", "be-2"})
	})
	for _, p := range both {
		greet(t, p)
	}
	// etcd back: both reconnect and follow the next change.
	f.etcd.start(t)
	waitFor(t, 15*time.Second, "both POPs reconnect", both, func(s fleetStatus) bool { return s.Etcd.Connected })
	rev := revisionOf(t, ctl(t, a.ns, false, "backend", "put", "be-3", "--wg-ip", coreIP, "--port", "9003"))
	waitFor(t, 2*time.Second, "both POPs catch up after etcd returned", both, func(s fleetStatus) bool {
		return s.Etcd.Revision >= rev && slices.Equal(s.ids(), []string{"be-1", "be-2", "be-3"})
	})

	// POP A cut off (its link to the core down) while keys change: it
	// routes on, then resumes its watch from where it was, with no full
	// load.
	fullLoads := func(p *fleetPOP) float64 {
		v, _ := scrape(t, p.ns).get(`edgeproxy_etcd_syncs_total{kind="full"}`)
		return v
	}
	fullA := fullLoads(a)
	cut(t, a)
	waitFor(t, 10*time.Second, "POP A reports etcd disconnected", both[:1], func(s fleetStatus) bool { return !s.Etcd.Connected })
	ctl(t, b.ns, false, "backend", "delete", "be-1")
	rev = revisionOf(t, ctl(t, b.ns, false, "backend", "put", "be-4", "--wg-ip", coreIP, "--port", "9004"))
	time.Sleep(500 * time.Millisecond)
	if st, err := statusOf(a); err != nil || !slices.Equal(st.ids(), []string{"be-1", "be-2", "be-3"}) {
		t.Fatalf("POP A's table changed while cut off: %v %v", st, err)
	}
	greet(t, a)
	heal(t, a)
	waitFor(t, 10*time.Second, "POP A catches up by resuming its watch", both, func(s fleetStatus) bool {
		return s.Etcd.Connected && s.Etcd.Revision >= rev && slices.Equal(s.ids(), []string{"be-2", "be-3", "be-4"})
	})
	if got := fullLoads(a); got != fullA {
		t.Fatalf("POP A did %v full loads after a short cut, want none (it resumes its watch)", got-fullA)
	}

	// POP B cut off while a key is deleted and the history compacted:
	// the revision it would resume from is gone, so it reloads in full
	// and the deleted key is gone from its table too.
	fullB := fullLoads(b)
	cut(t, b)
	waitFor(t, 10*time.Second, "POP B reports etcd disconnected", both[1:], func(s fleetStatus) bool { return !s.Etcd.Connected })
	ctl(t, a.ns, false, "backend", "delete", "be-2")
	ctl(t, a.ns, false, "backend", "put", "be-1", "--wg-ip", coreIP, "--port", "9001")
	cli := f.etcd.client(t)
	defer cli.Close()
	now := etcdRevision(t, f.etcd)
	if _, err := cli.Compact(withTimeout(t, 10*time.Second), now); err != nil {
		t.Fatalf("compact at %d: %v", now, err)
	}
	heal(t, b)
	want := []string{"be-1", "be-3", "be-4"}
	waitFor(t, 10*time.Second, "POP B reloads in full after the compaction", both, func(s fleetStatus) bool {
		return s.Etcd.Connected && slices.Equal(s.ids(), want)
	})
	if got := fullLoads(b); got != fullB+1 {
		t.Fatalf("POP B did %v full loads after the compaction, want 1", got-fullB)
	}
	if v, _ := scrape(t, b.ns).get(`edgeproxy_etcd_watch_restarts_total{reason="compacted"}`); v < 1 {
		t.Fatalf("POP B's watch restarts for compaction: %v, want >= 1", v)
	}
	// Exact: what B routes on is what etcd holds, key for key.
	resp, err := cli.Get(withTimeout(t, 5*time.Second), fleetPrefix+"backends/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var inEtcd []string
	for _, kv := range resp.Kvs {
		inEtcd = append(inEtcd, strings.TrimPrefix(string(kv.Key), fleetPrefix+"backends/"))
	}
	slices.Sort(inEtcd)
	if !slices.Equal(inEtcd, want) {
		t.Fatalf("etcd holds %v, POP B routes on %v", inEtcd, want)
	}
	for _, p := range both {
		if got := greet(t, p); got == "be-2" {
			t.Fatalf("%s still routes to be-2, deleted in etcd", p.ns.Name)
		}
	}
}

// cut makes etcd unreachable from the POP (a prohibit route: every
// packet to it refused at once), as a partition would; the backends stay
// reachable.
func cut(t *testing.T, p *fleetPOP) {
	t.Helper()
	nettest.MustRun(t, "ip", "-n", p.ns.Name, "route", "add", "prohibit", etcdIP+"/32")
}

func heal(t *testing.T, p *fleetPOP) {
	t.Helper()
	nettest.MustRun(t, "ip", "-n", p.ns.Name, "route", "del", "prohibit", etcdIP+"/32")
}

// TestEtcdExportImport: ctl export writes a routing.db a plain edgeproxy
// loads; ctl import loads a single-POP database into etcd, without its
// rows marked deleted.
func TestEtcdExportImport(t *testing.T) {
	f := newFleet(t, 1)
	a := f.pops[0]
	dir := t.TempDir()
	src := filepath.Join(dir, "single.db")
	writeDB(t, src, []backendRow{
		{ID: "imp-1", Region: "eu", Country: "FR", Addr: coreIP, Port: 9001, Healthy: true, Weight: 3, Soft: 10, Hard: 20},
		{ID: "imp-2", Region: "sa", Country: "BR", Addr: coreIP, Port: 9002, Healthy: false, Weight: 1, Soft: 5},
	})
	db, err := sql.Open("sqlite", src)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO backends VALUES ('gone', 'test', 'sa', 'BR', '10.0.0.9', 80, 1, 1, 1, 0, 1)`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	out := ctl(t, a.ns, false, "import", "--db", src)
	if !strings.Contains(out, "imported 2 backends") {
		t.Fatalf("import: %q", out)
	}
	listed := ctl(t, a.ns, false, "backend", "list", "--json")
	var rows []map[string]any
	if err := json.Unmarshal([]byte(listed), &rows); err != nil {
		t.Fatalf("backend list --json: %v\n%s", err, listed)
	}
	if len(rows) != 2 || rows[0]["id"] != "imp-1" || rows[0]["weight"] != 3.0 || rows[1]["healthy"] != 0.0 {
		t.Fatalf("etcd after import: %s", listed)
	}
	dst := filepath.Join(dir, "exported.db")
	ctl(t, a.ns, false, "export", "--db", dst)
	// A plain edgeproxy (no etcd) explains a route from the exported file.
	explained, err := exec.Command(binary, "route", "--db", dst, "--region", "eu", "203.0.113.9").CombinedOutput()
	if err != nil || !strings.Contains(string(explained), "imp-1") {
		t.Fatalf("edgeproxy route on the exported db: %v\n%s", err, explained)
	}
}

// TestEtcdWireGuardOverlayFollowsPopPut: two POPs, each an edgeproxy
// binary running its WireGuard overlay (userspace device) and following
// etcd. A `ctl pop put` of POP B gives POP A its peer and route at once;
// a client of POP A then reaches a backend only POP B can reach, through
// the tunnel; `ctl pop delete` takes the peer and route away again.
func TestEtcdWireGuardOverlayFollowsPopPut(t *testing.T) {
	const (
		underA, underB  = "192.168.78.1", "192.168.78.2"
		overA, overB    = "10.51.1.1", "10.51.2.1"
		behindB, bakIP  = "10.61.2.1", "10.61.2.2"
		behindNet       = "10.61.2.0/24"
		followBound     = 2 * time.Second // 1 s, plus the userspace device's own reconfiguration
		handshakeBound  = 12 * time.Second
		backendID, port = "backend-b", "9000"
	)
	f := newFleet(t, 2)
	a, b := f.pops[0], f.pops[1]
	nettest.Link(t, a.ns, underA+"/24", b.ns, underB+"/24")
	bak := nettest.NewNS(t, "bakb")
	nettest.Link(t, b.ns, behindB+"/24", bak, bakIP+"/24")
	nettest.MustRun(t, "ip", "-n", bak.Name, "route", "add", "default", "via", behindB)
	nettest.MustRun(t, "ip", "netns", "exec", b.ns.Name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	nettest.Serve(t, bak, net.JoinHostPort(bakIP, port), nettest.Greeter(backendID))

	dir := t.TempDir()
	keyA, keyB := filepath.Join(dir, "a.key"), filepath.Join(dir, "b.key")
	privA, err := overlay.WriteKeyFile(keyA, false)
	if err != nil {
		t.Fatal(err)
	}
	privB, err := overlay.WriteKeyFile(keyB, false)
	if err != nil {
		t.Fatal(err)
	}
	ifaceA, ifaceB := wgIfaceName("a"), wgIfaceName("b")
	wgEnv := func(iface, key, addr, id string) []string {
		return []string{"EDGEPROXY_WG_INTERFACE=" + iface, "EDGEPROXY_WG_PRIVATE_KEY_FILE=" + key,
			"EDGEPROXY_WG_LISTEN_PORT=51820", "EDGEPROXY_WG_ADDRESS=" + addr + "/16", "EDGEPROXY_POP_ID=" + id}
	}
	ctl(t, a.ns, false, "backend", "put", backendID, "--wg-ip", bakIP, "--port", port)
	ctl(t, a.ns, false, "pop", "put", "pop-a", "--public-key", privA.PublicKey().String(),
		"--endpoint", underA+":51820", "--wg-ip", overA, "--allowed-ips", overA+"/32")
	f.startPOP(t, a, "sockmap", nil, wgEnv(ifaceA, keyA, overA, "pop-a")...)
	f.startPOP(t, b, "splice", nil, wgEnv(ifaceB, keyB, overB, "pop-b")...)

	// Peers are named by the rows the test wrote to etcd, not by a POP's
	// routing.db: a peer that arrives before the test reads the file
	// must still show by its name.
	rowA, err := overlay.ParsePopRow("pop-a", "", privA.PublicKey().String(), underA+":51820", overA, overA+"/32")
	if err != nil {
		t.Fatal(err)
	}
	rowB, err := overlay.ParsePopRow("pop-b", "", privB.PublicKey().String(), underB+":51820", overB, overB+"/32,"+behindNet)
	if err != nil {
		t.Fatal(err)
	}
	named := []overlay.Pop{rowA, rowB}
	popsOf := func(*fleetPOP) []overlay.Pop { return named }

	// Only pop-a in etcd: POP B has it as a peer, POP A has no peer.
	waitPeers(t, b.ns, ifaceB, popsOf(b), followBound, "POP B has pop-a as a peer", func(p map[string]overlay.PeerStatus) bool {
		_, ok := p["pop-a"]
		return ok
	})
	if peers := peersIn(t, a.ns, ifaceA, popsOf(a)); len(peers) != 0 {
		t.Fatalf("POP A has peers before pop-b is in etcd: %v", peers)
	}

	if c, err := nettest.Dial(a.ns, net.JoinHostPort(bakIP, port), 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("POP A reaches the backend without the tunnel: the topology leaks")
	}

	// One ctl put of pop-b and POP A follows.
	ctl(t, a.ns, false, "pop", "put", "pop-b", "--public-key", privB.PublicKey().String(),
		"--endpoint", underB+":51820", "--wg-ip", overB, "--allowed-ips", overB+"/32,"+behindNet)
	start := time.Now()
	waitPeers(t, a.ns, ifaceA, popsOf(a), followBound, "POP A adds pop-b from etcd", func(p map[string]overlay.PeerStatus) bool {
		pb, ok := p["pop-b"]
		return ok && pb.Endpoint == underB+":51820"
	})
	waitRoute(t, a.ns, behindNet, followBound, "POP A routes "+behindNet+" through "+ifaceA, func(r string) bool {
		return strings.Contains(r, "dev "+ifaceA)
	})
	t.Logf("POP A's overlay followed the pop put in %v", time.Since(start))

	waitPeers(t, a.ns, ifaceA, popsOf(a), handshakeBound, "POP A's tunnel to pop-b has a handshake", func(p map[string]overlay.PeerStatus) bool {
		return !p["pop-b"].HandshakeNever()
	})
	if got := greet(t, a); got != backendID {
		t.Fatalf("POP A's client reached %q, want %s through the tunnel", got, backendID)
	}

	// The row deleted in etcd: the peer and its route leave POP A.
	ctl(t, a.ns, false, "pop", "delete", "pop-b")
	waitPeers(t, a.ns, ifaceA, named, followBound, "POP A drops pop-b", func(p map[string]overlay.PeerStatus) bool {
		_, ok := p["pop-b"]
		return !ok
	})
	waitRoute(t, a.ns, behindNet, followBound, "POP A stops routing "+behindNet, func(r string) bool { return r == "" })
}
