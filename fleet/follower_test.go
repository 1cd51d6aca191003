package fleet

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// startEtcd runs Debian's etcd on loopback (runEtcd) and returns a client
// that it answers.
func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	url := runEtcd(t, "http")
	cli, err := Connect(Config{Endpoints: []string{url}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	waitAnswers(t, cli)
	return cli
}

// runEtcd runs etcd on loopback with free ports and its data on tmpfs,
// for the life of the test, and returns its client URL (scheme http or
// https, extra flags as given). Without the binary the test fails in CI
// and skips elsewhere, saying what to install.
func runEtcd(t *testing.T, scheme string, extra ...string) string {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("etcd is not installed (%v); CI installs Debian's etcd-server", err)
		}
		t.Skipf("etcd is not installed (%v): apt-get install etcd-server (or make deps) to run the follower against a real server", err)
	}
	client, peer := freePort(t), freePort(t)
	base := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "edgeproxy-fleet-etcd-")
	if err != nil {
		t.Fatal(err)
	}
	clientURL, peerURL := scheme+"://"+client, "http://"+peer
	args := append([]string{"--name", "unit", "--data-dir", dir,
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "unit=" + peerURL, "--heartbeat-interval", "50", "--election-timeout", "500"}, extra...)
	cmd := exec.Command("etcd", args...)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		os.RemoveAll(dir)
	})
	return clientURL
}

// waitAnswers waits up to 30 s for etcd to serve a read through cli.
func waitAnswers(t *testing.T, cli *clientv3.Client) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := contextWithTimeout(time.Second)
		_, err := cli.Get(ctx, "probe")
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd at %v not answering after 30s: %v", cli.Endpoints(), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func put(t *testing.T, cli *clientv3.Client, key, value string) int64 {
	t.Helper()
	resp, err := cli.Put(ctxFor(t), DefaultPrefix+key, value)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

func backendIDs(t *testing.T, db string) []string {
	t.Helper()
	rows, rowErrs, err := routing.ReadRows(db)
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("read %s: %v %v", db, err, rowErrs)
	}
	var ids []string
	for _, b := range rows.Backends {
		ids = append(ids, b.ID)
	}
	return ids
}

func backendJSON(port int) string {
	return fmt.Sprintf(`{"wg_ip":"127.0.0.1","port":%d,"healthy":1}`, port)
}

func TestKeys(t *testing.T) {
	if got := Key("/ep", routing.TableRegions, "br"); got != "/ep/regions/BR" {
		t.Fatalf("region key %q", got)
	}
	for key, want := range map[string]string{
		"/edgeproxy/backends/a":     "backends a",
		"/edgeproxy/pops/p/x":       "pops p/x", // the id is all after the table
		"/edgeproxy/other/a":        "error",
		"/edgeproxy/backends":       "error",
		"/edgeproxy2/backends/a":    "error",
		"/edgeproxy/regions/BR":     "regions BR",
		"/edgeproxy/backends/a b c": "backends a b c",
	} {
		table, id, err := parseKey(DefaultPrefix, key)
		got := table + " " + id
		if err != nil {
			got = "error"
		}
		if got != want {
			t.Errorf("parseKey(%q) = %q (%v), want %q", key, got, err, want)
		}
	}
	if NormalizePrefix("/x") != "/x/" || NormalizePrefix("") != DefaultPrefix {
		t.Fatal("NormalizePrefix")
	}
}

// The full load is exact: local rows etcd does not hold go, invalid
// values are skipped and counted, and the local row under a key whose
// value became invalid stays.
func TestSyncReplacesTheLocalTable(t *testing.T) {
	cli := startEtcd(t)
	db := filepath.Join(t.TempDir(), "routing.db")
	local := routing.Backend{ID: "local-only", Port: 80}
	kept := routing.Backend{ID: "typo", Port: 81}
	for _, b := range []*routing.Backend{&local, &kept} {
		b.Addr = netip.MustParseAddr("127.0.0.1")
	}
	if err := routing.ApplyChanges(db, []routing.Change{
		{Table: routing.TableBackends, ID: local.ID, Backend: &local},
		{Table: routing.TableBackends, ID: kept.ID, Backend: &kept},
	}); err != nil {
		t.Fatal(err)
	}
	put(t, cli, "backends/a", backendJSON(9001))
	put(t, cli, "backends/typo", `{"wg_ip":"127.0.0.1","port":"eighty"}`)
	put(t, cli, "regions/br", `{"region":"eu"}`)
	rev := put(t, cli, "nonsense/x", `{}`)

	var applied atomic.Int32
	f := NewFollower(cli, DefaultPrefix, db, quietLog())
	f.OnApplied = func() { applied.Add(1) }
	if err := f.Sync(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
	if got := backendIDs(t, db); !slices.Equal(got, []string{"a", "typo"}) {
		t.Fatalf("after the full load: %v, want a (from etcd) and typo (kept: its etcd value is invalid)", got)
	}
	tbl, _, err := routing.LoadTable(db)
	if err != nil || tbl.RegionOf("BR") != "eu" {
		t.Fatalf("region override not written: %v %v", tbl.RegionOf("BR"), err)
	}
	st := f.Status()
	if !st.Connected || st.Revision != rev || st.LastSync.IsZero() || applied.Load() != 1 {
		t.Fatalf("status %+v, applied %d; want connected at revision %d, applied once", st, applied.Load(), rev)
	}
	if f.skipped["backends"] != 1 || f.skipped["unknown"] != 1 || f.syncs["full"] != 1 {
		t.Fatalf("skipped %v, syncs %v", f.skipped, f.syncs)
	}
}

// Run follows changes: a transaction of several keys is one write of
// routing.db, applied at once; a delete removes the row.
func TestRunFollowsChanges(t *testing.T) {
	cli := startEtcd(t)
	db := filepath.Join(t.TempDir(), "routing.db")
	put(t, cli, "backends/a", backendJSON(9001))
	var applied atomic.Int32
	f := NewFollower(cli, DefaultPrefix, db, quietLog())
	f.OnApplied = func() { applied.Add(1) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, func() bool { return f.Status().Revision > 0 }, "the first full load")

	resp, err := cli.Txn(ctxFor(t)).Then(
		clientv3.OpPut(DefaultPrefix+"backends/b", backendJSON(9002)),
		clientv3.OpPut(DefaultPrefix+"backends/c", backendJSON(9003)),
		clientv3.OpDelete(DefaultPrefix+"backends/a"),
	).Commit()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return f.Status().Revision == resp.Header.Revision }, "the transaction applied")
	if got := backendIDs(t, db); !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("after the transaction: %v", got)
	}
	f.mu.Lock()
	watchSyncs := f.syncs["watch"]
	f.mu.Unlock()
	if watchSyncs != 1 || applied.Load() != 2 {
		t.Fatalf("one transaction made %d watch writes and %d applies (with the full load), want 1 and 2", watchSyncs, applied.Load())
	}
}

// A follower that was away while the history was compacted reloads in
// full and drops the key deleted meanwhile.
func TestRunResyncsAfterCompaction(t *testing.T) {
	cli := startEtcd(t)
	db := filepath.Join(t.TempDir(), "routing.db")
	put(t, cli, "backends/a", backendJSON(9001))
	put(t, cli, "backends/b", backendJSON(9002))
	f := NewFollower(cli, DefaultPrefix, db, quietLog())
	if err := f.Sync(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Delete(ctxFor(t), DefaultPrefix+"backends/a"); err != nil {
		t.Fatal(err)
	}
	rev := put(t, cli, "backends/c", backendJSON(9003))
	if _, err := cli.Compact(ctxFor(t), rev); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, func() bool { return f.Status().Revision >= rev }, "the resync")
	if got := backendIDs(t, db); !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("after the resync: %v, want b and c", got)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.restarts[restartCompacted] != 1 || f.syncs["full"] != 2 {
		t.Fatalf("restarts %v, syncs %v; want one compaction restart and a second full load", f.restarts, f.syncs)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A change that cannot be written to routing.db is not counted as
// applied: the watch restarts from the last revision written and the
// change lands once the file can be written again.
func TestRunRetriesAChangeItCouldNotWrite(t *testing.T) {
	cli := startEtcd(t)
	db := filepath.Join(t.TempDir(), "routing.db")
	put(t, cli, "backends/a", backendJSON(9001))
	f := NewFollower(cli, DefaultPrefix, db, quietLog())
	f.ProbeInterval = 100 * time.Millisecond
	if err := f.Sync(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
	before := f.Status().Revision
	// A directory where the file was: every write fails.
	if err := os.Rename(db, db+".aside"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(db, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	rev := put(t, cli, "backends/b", backendJSON(9002))
	waitFor(t, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.restarts[restartWriteFailed] > 0
	}, "a failed write")
	if st := f.Status(); st.Revision != before || !strings.Contains(st.LastError, "is a directory") {
		t.Fatalf("after a failed write: %+v; want revision %d kept and the error", st, before)
	}
	if err := os.Remove(db); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(db+".aside", db); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return f.Status().Revision == rev }, "the change written once the file is back")
	if got := backendIDs(t, db); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("after the retry: %v", got)
	}
}
