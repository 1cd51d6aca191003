package routing

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultPoll is how often Watch checks routing.db for a change when given
// no interval: cheap enough to run constantly, quick enough that an
// operator's edit is live before they look.
const DefaultPoll = 250 * time.Millisecond

// Store holds the current routing snapshot and replaces it when routing.db
// changes. Current never blocks and never sees a half-built table.
type Store struct {
	path string
	opts LoadOptions
	snap atomic.Pointer[snapshot]
	// reloading serializes reloads, so a SIGHUP Reload and Watch never race
	// to publish an older table over a newer one.
	reloading sync.Mutex
}

type snapshot struct {
	table   *Table
	rowErrs []RowError
}

// ReloadResult is the outcome of one reload attempt. Table is the snapshot
// in force afterwards: the new one if Changed, the old one otherwise.
type ReloadResult struct {
	Table     *Table
	RowErrors []RowError // rows skipped by this load
	Err       error      // the load failed; the old snapshot stays
	Changed   bool       // a table with a different Version was published
}

// OpenStore loads path; unlike a reload, a failed first load is an error,
// since there is no older snapshot to keep serving.
func OpenStore(path string) (*Store, error) { return OpenStoreWith(path, LoadOptions{}) }

// OpenStoreWith is OpenStore whose every load, the first and each reload,
// applies opts (LoadTableWith). The snapshot carries the pops table too, so
// a change to pops alone publishes a new table (ReloadResult.Changed) and
// one watcher serves the routing and the overlay.
func OpenStoreWith(path string, opts LoadOptions) (*Store, error) {
	t, rowErrs, err := LoadTableWith(path, opts)
	if err != nil {
		return nil, err
	}
	s := &Store{path: path, opts: opts}
	s.snap.Store(&snapshot{table: t, rowErrs: rowErrs})
	return s, nil
}

// Path is the database the store reads.
func (s *Store) Path() string { return s.path }

// Current is the snapshot to route with.
func (s *Store) Current() *Table { return s.snap.Load().table }

// RowErrors are the rows the most recent successful load skipped, including
// OpenStore's, so the proxy can report them at start.
func (s *Store) RowErrors() []RowError { return s.snap.Load().rowErrs }

// Reload reads the database now (SIGHUP). A load that fails keeps the old
// snapshot and reports Err; a load whose content equals the current
// snapshot's keeps the old snapshot too, so Current stays pointer-stable
// while nothing changes.
func (s *Store) Reload() ReloadResult {
	s.reloading.Lock()
	defer s.reloading.Unlock()

	old := s.snap.Load()
	t, rowErrs, err := LoadTableWith(s.path, s.opts)
	if err != nil {
		return ReloadResult{Table: old.table, Err: fmt.Errorf("reload: %w", err)}
	}
	if t.Version == old.table.Version {
		s.snap.Store(&snapshot{table: old.table, rowErrs: rowErrs})
		return ReloadResult{Table: old.table, RowErrors: rowErrs}
	}
	s.snap.Store(&snapshot{table: t, rowErrs: rowErrs})
	return ReloadResult{Table: t, RowErrors: rowErrs, Changed: true}
}

// Watch polls until ctx ends. Every poll (DefaultPoll when <= 0) it checks
// cheaply whether the database changed and reloads when it did; it also
// reloads unconditionally once maxInterval (EDGEPROXY_DB_RELOAD_SECS; <= 0
// disables it) has passed since the last reload, as a backstop for changes
// the cheap check cannot see. onReload, if not nil, is called from Watch's
// goroutine for every reload that published a new table or failed.
//
// The cheap check is PRAGMA data_version on a long-lived read-only
// connection, which changes when any other connection commits (the sqlite3
// shell, a replication agent), plus the file's identity, size and mtime, so
// a file replaced by rename is seen too. A failing state (file missing,
// corrupt) is reported once when it appears and then again only at
// maxInterval, not at every poll.
func (s *Store) Watch(ctx context.Context, poll, maxInterval time.Duration, onReload func(ReloadResult)) {
	if poll <= 0 {
		poll = DefaultPoll
	}
	w := &dbWatcher{path: s.path}
	defer w.close()

	report := func(res ReloadResult) {
		if onReload != nil && (res.Changed || res.Err != nil) {
			onReload(res)
		}
	}
	// Stamp first, then reload, so a change between OpenStore and now is
	// picked up and a change during the reload shows at the next poll.
	last := w.stamp(ctx)
	report(s.Reload())
	lastReload := time.Now()

	ticker := time.NewTicker(poll)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		cur := w.stamp(ctx)
		due := maxInterval > 0 && time.Since(lastReload) >= maxInterval
		if cur.equal(last) && !due {
			continue
		}
		last = cur
		report(s.Reload())
		lastReload = time.Now()
	}
}

// dbWatcher keeps the connection PRAGMA data_version needs: the counter is
// per connection, so it only means something on one that stays open.
type dbWatcher struct {
	path string
	db   *sql.DB
	conn *sql.Conn
	file os.FileInfo // the file conn was opened on
}

// dbStamp is what the cheap check compares between polls.
type dbStamp struct {
	file        os.FileInfo
	dataVersion int64
	err         string
}

func (a dbStamp) equal(b dbStamp) bool {
	if a.err != b.err || a.dataVersion != b.dataVersion || (a.file == nil) != (b.file == nil) {
		return false
	}
	return a.file == nil || sameContent(a.file, b.file)
}

// sameContent is the stat half of the check: os.SameFile compares device
// and inode, which a rename onto the path changes.
func sameContent(a, b os.FileInfo) bool {
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}

func (w *dbWatcher) stamp(ctx context.Context) dbStamp {
	fi, err := os.Stat(w.path)
	if err != nil {
		w.close()
		return dbStamp{err: err.Error()}
	}
	if w.conn != nil && !os.SameFile(fi, w.file) {
		w.close() // replaced: the old connection watches the old inode
	}
	if w.conn == nil {
		if err := w.open(ctx, fi); err != nil {
			return dbStamp{file: fi, err: err.Error()}
		}
	}
	var v int64
	if err := w.conn.QueryRowContext(ctx, "PRAGMA data_version").Scan(&v); err != nil {
		w.close()
		return dbStamp{file: fi, err: err.Error()}
	}
	return dbStamp{file: fi, dataVersion: v}
}

func (w *dbWatcher) open(ctx context.Context, fi os.FileInfo) error {
	db, err := OpenReadOnly(w.path)
	if err != nil {
		return err
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return fmt.Errorf("watch routing db %s: %w", w.path, err)
	}
	w.db, w.conn, w.file = db, conn, fi
	return nil
}

func (w *dbWatcher) close() {
	if w.conn != nil {
		w.conn.Close()
	}
	if w.db != nil {
		w.db.Close()
	}
	w.db, w.conn, w.file = nil, nil, nil
}
