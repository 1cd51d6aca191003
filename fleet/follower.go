package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Follower keeps the local routing.db equal to what etcd holds under the
// prefix:
//
//   - Sync, the full load: one Get of the prefix at one revision, written
//     with routing.ReplaceRows, so local rows etcd does not hold go.
//   - Run: a full load when none has succeeded yet, then a watch from the
//     next revision. Each watch response is written in one transaction
//     (routing.ApplyChanges), then OnApplied tells the store to apply it
//     at once.
//   - A probe (a linearizable read) every ProbeInterval: when it fails the
//     watch is dropped and etcd reported disconnected; once the probe
//     passes again the watch resumes from the last revision applied. If
//     that revision was compacted meanwhile, a full load replaces the
//     table, which removes the keys deleted in between.
//
// While etcd is unreachable nothing is written: the proxy routes on the
// table it has. A value that is not a valid row is skipped with its key and
// reason (logged, counted) and never written; the row its key had stays as
// it was, so a typo in one write does not take a backend out of the fleet.
type Follower struct {
	cli    *clientv3.Client
	prefix string
	dbPath string
	log    *slog.Logger
	// OnApplied, if set, is called after each write to routing.db has
	// committed. Set it before Run.
	OnApplied func()
	// ProbeInterval is how often reachability is checked while watching;
	// a probe may take as long before it counts as failed. 0: 1 s.
	ProbeInterval time.Duration
	now           func() time.Time

	mu        sync.Mutex
	connected bool
	revision  int64 // the last revision written to routing.db
	lastSync  time.Time
	lastErr   string
	syncs     map[string]uint64 // "full", "watch"
	restarts  map[string]uint64 // why the watch restarted
	skipped   map[string]uint64 // by table
}

// NewFollower follows the keys under prefix into the routing database at
// dbPath.
func NewFollower(cli *clientv3.Client, prefix, dbPath string, log *slog.Logger) *Follower {
	return &Follower{
		cli: cli, prefix: NormalizePrefix(prefix), dbPath: dbPath, log: log, now: time.Now,
		syncs:    map[string]uint64{"full": 0, "watch": 0},
		restarts: map[string]uint64{},
		skipped:  map[string]uint64{},
	}
}

// Status is the follower's state for /status and `edgeproxy status`.
type Status struct {
	Connected bool      // the last request to etcd succeeded
	Revision  int64     // the last etcd revision written to routing.db; 0: none yet
	LastSync  time.Time // when that revision was written
	LastError string    // the last failure talking to etcd or writing routing.db
}

// Status is a copy of the follower's state.
func (f *Follower) Status() Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return Status{Connected: f.connected, Revision: f.revision, LastSync: f.lastSync, LastError: f.lastErr}
}

// Sync does a full load: it reads every key under the prefix at one
// revision and makes routing.db hold exactly those rows (a local row whose
// key holds an invalid value is kept). It is what Run does first; call it
// before the proxy opens routing.db so a new POP starts on the fleet's
// table.
func (f *Follower) Sync(ctx context.Context) error {
	snap, err := Load(ctx, f.cli, f.prefix)
	if err != nil {
		f.setDisconnected(err)
		return err
	}
	f.setConnected()
	for _, s := range snap.Skipped {
		f.skip(s)
	}
	keep := func(table, id string) bool { return snap.invalid[table][id] }
	removed, err := routing.ReplaceRows(f.dbPath, snap.Rows, keep)
	if err != nil {
		f.setError(err)
		return fmt.Errorf("etcd full load at revision %d: %w", snap.Revision, err)
	}
	f.applied(snap.Revision, "full")
	f.log.Info("etcd full load written to routing db", "revision", snap.Revision, "backends", len(snap.Rows.Backends),
		"pops", len(snap.Rows.Pops), "regions", len(snap.Rows.Regions), "removed", len(removed), "skipped", len(snap.Skipped))
	for _, c := range removed {
		f.log.Info("etcd full load removed a local row etcd does not hold", "row", c.Table+"/"+c.ID)
	}
	return nil
}

// Run follows etcd until ctx ends.
func (f *Follower) Run(ctx context.Context) {
	resync := f.Status().Revision == 0
	wait := f.probeInterval()
	for ctx.Err() == nil {
		if resync {
			if err := f.Sync(ctx); err != nil {
				if ctx.Err() == nil {
					f.log.Warn("etcd full load failed; routing on the local table", "err", err)
				}
				sleep(ctx, wait)
				continue
			}
			resync = false
		}
		reason := f.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		f.mu.Lock()
		f.restarts[reason]++
		f.mu.Unlock()
		rev := f.Status().Revision
		switch reason {
		case restartCompacted:
			resync = true
			f.log.Warn("etcd compacted past the last applied revision; doing a full load", "revision", rev)
		case restartDisconnected:
			f.log.Warn("etcd watch stopped; resuming from the last applied revision once etcd answers", "reason", reason, "revision", rev)
		default:
			// etcd answers, yet the watch or the write failed: pause so a
			// failure that persists (a full disk) does not spin.
			f.log.Warn("etcd watch stopped; resuming from the last applied revision", "reason", reason, "revision", rev)
			sleep(ctx, wait)
		}
		f.waitReachable(ctx)
	}
}

// Why a watch restarted: the label of edgeproxy_etcd_watch_restarts_total.
const (
	restartDisconnected = "disconnected" // the probe failed
	restartCompacted    = "compacted"    // the next revision is compacted
	restartError        = "error"        // etcd ended the watch (no leader, auth, ...)
	restartWriteFailed  = "write_failed" // routing.db could not be written
	restartClosed       = "closed"       // the stream closed without a reason
)

// watch follows the prefix from the revision after the last one applied
// until the watch fails; it returns why.
func (f *Follower) watch(ctx context.Context) string {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	lost := make(chan struct{})
	go func() {
		defer close(lost)
		t := time.NewTicker(f.probeInterval())
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			if err := f.probe(wctx); err != nil {
				if wctx.Err() == nil {
					f.setDisconnected(err)
					cancel()
				}
				return
			}
		}
	}()
	defer func() { cancel(); <-lost }()

	from := f.Status().Revision + 1
	for resp := range f.cli.Watch(wctx, f.prefix, clientv3.WithPrefix(), clientv3.WithRev(from)) {
		if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
			return restartCompacted
		}
		if wctx.Err() != nil {
			break // the probe gave up on etcd, or Run is ending
		}
		if err := resp.Err(); err != nil {
			f.setDisconnected(err)
			return restartError
		}
		if resp.Canceled {
			return restartClosed
		}
		f.setConnected()
		if len(resp.Events) == 0 {
			continue
		}
		if err := f.applyEvents(resp.Events); err != nil {
			f.setError(err)
			f.log.Error("cannot write etcd changes to routing db; will retry them", "db", f.dbPath, "err", err)
			return restartWriteFailed
		}
	}
	if ctx.Err() == nil && wctx.Err() != nil {
		return restartDisconnected // only the probe cancels wctx while ctx lives
	}
	return restartClosed
}

// applyEvents writes one watch response in one transaction.
func (f *Follower) applyEvents(events []*clientv3.Event) error {
	var changes []routing.Change
	var rev int64
	for _, ev := range events {
		rev = max(rev, ev.Kv.ModRevision)
		key := string(ev.Kv.Key)
		if ev.Type == mvccpb.DELETE {
			table, id, err := parseKey(f.prefix, key)
			if err != nil {
				continue // nothing of ours was there
			}
			changes = append(changes, routing.Change{Table: table, ID: id})
			continue
		}
		c, err := decode(f.prefix, key, ev.Kv.Value)
		if err != nil {
			f.skip(Skipped{Key: key, Table: tableLabel(c.Table), Reason: err.Error()})
			continue
		}
		changes = append(changes, c)
	}
	if len(changes) > 0 {
		if err := routing.ApplyChanges(f.dbPath, changes); err != nil {
			return fmt.Errorf("revision %d: %w", rev, err)
		}
	}
	f.applied(rev, "watch")
	for _, c := range changes {
		f.log.Info("etcd change written to routing db", "change", c.String(), "revision", rev)
	}
	return nil
}

// probe is a linearizable read: it fails when this POP cannot reach a
// member that is part of a quorum, so a POP that only reaches a
// partitioned minority counts as disconnected.
func (f *Follower) probe(ctx context.Context) error {
	timeout := 2 * f.probeInterval()
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := f.cli.Get(pctx, f.prefix, clientv3.WithCountOnly())
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("etcd probe: no answer within %v: %w", timeout, err)
		}
		return fmt.Errorf("etcd probe: %w", err)
	}
	return nil
}

// waitReachable probes until etcd answers or ctx ends.
func (f *Follower) waitReachable(ctx context.Context) {
	for ctx.Err() == nil {
		if err := f.probe(ctx); err == nil {
			f.setConnected()
			return
		} else if ctx.Err() == nil {
			f.setDisconnected(err)
		}
		sleep(ctx, f.probeInterval())
	}
}

func (f *Follower) probeInterval() time.Duration {
	if f.ProbeInterval > 0 {
		return f.ProbeInterval
	}
	return time.Second
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (f *Follower) applied(rev int64, kind string) {
	f.mu.Lock()
	f.revision, f.lastSync = rev, f.now()
	f.syncs[kind]++
	f.mu.Unlock()
	if f.OnApplied != nil {
		f.OnApplied()
	}
}

func (f *Follower) skip(s Skipped) {
	f.mu.Lock()
	f.skipped[s.Table]++
	f.mu.Unlock()
	f.log.Warn("etcd value skipped: not a valid row", "key", s.Key, "reason", s.Reason)
}

func (f *Follower) setConnected() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.connected {
		f.log.Info("etcd connected", "prefix", f.prefix)
	}
	f.connected = true
}

func (f *Follower) setDisconnected(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.connected {
		f.log.Warn("etcd unreachable; routing on the local table", "err", err)
	}
	f.connected, f.lastErr = false, err.Error()
}

func (f *Follower) setError(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastErr = err.Error()
}
