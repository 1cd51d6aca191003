package routing

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"testing"
	"time"
)

const rowA = `INSERT INTO backends VALUES ('a', 'x', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0)`

var notADatabase = []byte("SQLite format 2? no: this file is not a database at all, and it is long enough to look like a header\n")

func mustOpenStore(t *testing.T, path string) *Store {
	t.Helper()
	s, err := OpenStore(path)
	if err != nil {
		t.Fatalf("OpenStore: %v", err)
	}
	return s
}

// replaceFile writes data beside path and renames it into place, as a
// deploy tool would.
func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestOpenStoreFailsWhenFirstLoadFails(t *testing.T) {
	if _, err := OpenStore(filepath.Join(t.TempDir(), "missing.db")); err == nil {
		t.Error("OpenStore succeeded on a missing file")
	}
}

func TestStoreRowErrorsOfFirstLoad(t *testing.T) {
	s := mustOpenStore(t, newDB(t, contractSchema, rowA,
		`INSERT INTO backends VALUES ('b', 'x', 'sa', 'BR', '10.0.0.2', 70000, 1, 1, 10, 20, 0)`))
	if errs := s.RowErrors(); len(errs) != 1 || errs[0].ID != "b" {
		t.Errorf("RowErrors = %v, want one for b", errs)
	}
}

func TestReloadWithoutChangeKeepsSnapshot(t *testing.T) {
	s := mustOpenStore(t, newDB(t, contractSchema, rowA))
	before := s.Current()
	res := s.Reload()
	if res.Err != nil || res.Changed || res.Table != before || s.Current() != before {
		t.Errorf("reload of unchanged db: %+v; want no error, not changed, same snapshot", res)
	}
}

func TestReloadKeepsLastGoodSnapshot(t *testing.T) {
	path := newDB(t, contractSchema, rowA)
	s := mustOpenStore(t, path)
	good := s.Current()

	breakages := []struct {
		name  string
		apply func()
	}{
		{"corrupt file", func() { replaceFile(t, path, notADatabase) }},
		{"file overwritten in place", func() {
			if err := os.WriteFile(path, notADatabase, 0o644); err != nil {
				t.Fatal(err)
			}
		}},
		{"file removed", func() { os.Remove(path) }},
		{"backends table dropped", func() {
			os.Remove(path)
			writeDB(t, path, `CREATE TABLE other (x)`)
		}},
	}
	for _, br := range breakages {
		t.Run(br.name, func(t *testing.T) {
			br.apply()
			res := s.Reload()
			if res.Err == nil || res.Changed {
				t.Fatalf("reload: %+v; want an error and no change", res)
			}
			if res.Table != good || s.Current() != good {
				t.Error("the last good snapshot was replaced")
			}
		})
	}

	os.Remove(path)
	writeDB(t, path, contractSchema, rowA, `INSERT INTO backends VALUES ('b', 'x', 'us', 'US', '10.0.0.2', 80, 1, 1, 10, 20, 0)`)
	res := s.Reload()
	if res.Err != nil || !res.Changed || s.Current() == good || len(s.Current().Backends) != 2 {
		t.Errorf("reload after repair: %+v", res)
	}
}

// watch runs s.Watch until the test ends and delivers its reports.
func watch(t *testing.T, s *Store, poll, maxInterval time.Duration) <-chan ReloadResult {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	reports := make(chan ReloadResult, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Watch(ctx, poll, maxInterval, func(r ReloadResult) { reports <- r })
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	// Let Watch take its first stamp, so the change below is seen by the
	// poll, not by Watch's opening reload.
	time.Sleep(2 * DefaultPoll)
	return reports
}

func awaitReport(t *testing.T, reports <-chan ReloadResult, within time.Duration) (ReloadResult, time.Duration) {
	t.Helper()
	start := time.Now()
	select {
	case r := <-reports:
		return r, time.Since(start)
	case <-time.After(within):
		t.Fatalf("no reload reported within %v", within)
		return ReloadResult{}, 0
	}
}

func expectQuiet(t *testing.T, reports <-chan ReloadResult, d time.Duration) {
	t.Helper()
	select {
	case r := <-reports:
		t.Errorf("unexpected report %+v", r)
	case <-time.After(d):
	}
}

func TestWatchSeesChangeFromAnotherConnectionWithinOneSecond(t *testing.T) {
	path := newDB(t, contractSchema, rowA)
	s := mustOpenStore(t, path)
	// The backstop is off: only the cheap check can notice.
	reports := watch(t, s, DefaultPoll, 0)

	// A second handle that stays open, standing in for an operator's sqlite3
	// shell.
	shell, err := sql.Open(sqliteDriver, path)
	if err != nil {
		t.Fatal(err)
	}
	defer shell.Close()
	shell.SetMaxOpenConns(1)

	for i, stmt := range []string{
		`UPDATE backends SET healthy = 0 WHERE id = 'a'`,
		`UPDATE backends SET healthy = 1 WHERE id = 'a'`,
	} {
		if _, err := shell.Exec(stmt); err != nil {
			t.Fatal(err)
		}
		res, took := awaitReport(t, reports, time.Second)
		if res.Err != nil || !res.Changed {
			t.Fatalf("change %d: report %+v", i, res)
		}
		if got, want := s.Current().Backends[0].Healthy, i == 1; got != want {
			t.Errorf("change %d: healthy = %v, want %v", i, got, want)
		}
		t.Logf("change %d seen after %v", i, took)
	}
	// Rewriting a value with itself commits, but publishes nothing new.
	if _, err := shell.Exec(`UPDATE backends SET healthy = 1 WHERE id = 'a'`); err != nil {
		t.Fatal(err)
	}
	expectQuiet(t, reports, 3*DefaultPoll)
}

func TestWatchSeesReplacedFileWithinOneSecond(t *testing.T) {
	path := newDB(t, contractSchema, rowA)
	s := mustOpenStore(t, path)
	reports := watch(t, s, DefaultPoll, 0)

	next := filepath.Join(filepath.Dir(path), "next.db")
	writeDB(t, next, contractSchema, `INSERT INTO backends VALUES ('z', 'x', 'eu', 'FR', '10.0.0.9', 80, 1, 1, 10, 20, 0)`)
	if err := os.Rename(next, path); err != nil {
		t.Fatal(err)
	}
	res, _ := awaitReport(t, reports, time.Second)
	if res.Err != nil || !res.Changed || s.Current().Index("z") != 0 {
		t.Errorf("report %+v, backends %v", res, ids(s.Current()))
	}
}

func TestWatchReportsAFailingFileOnce(t *testing.T) {
	path := newDB(t, contractSchema, rowA)
	s := mustOpenStore(t, path)
	good := s.Current()
	reports := watch(t, s, 50*time.Millisecond, 0)

	replaceFile(t, path, notADatabase)
	if res, _ := awaitReport(t, reports, time.Second); res.Err == nil || res.Table != good {
		t.Fatalf("report %+v; want an error and the old table", res)
	}
	expectQuiet(t, reports, 500*time.Millisecond)
	if s.Current() != good {
		t.Error("the last good snapshot was replaced")
	}

	// Repaired atomically: a watcher that saw the file missing in between
	// would rightly report that too.
	fixed := filepath.Join(filepath.Dir(path), "fixed.db")
	writeDB(t, fixed, contractSchema, `INSERT INTO backends VALUES ('fixed', 'x', 'eu', 'FR', '10.0.0.9', 80, 1, 1, 10, 20, 0)`)
	if err := os.Rename(fixed, path); err != nil {
		t.Fatal(err)
	}
	if res, _ := awaitReport(t, reports, time.Second); res.Err != nil || !res.Changed {
		t.Errorf("report after repair %+v", res)
	}
}

func TestWatchBackstopRetriesAtMaxInterval(t *testing.T) {
	path := newDB(t, contractSchema, rowA)
	s := mustOpenStore(t, path)
	reports := watch(t, s, 50*time.Millisecond, 200*time.Millisecond)

	replaceFile(t, path, notADatabase)
	for i := range 3 {
		if res, _ := awaitReport(t, reports, time.Second); res.Err == nil {
			t.Fatalf("report %d: %+v; want the failure again", i, res)
		}
	}
}

func TestWatchSeesChangesToAWALDatabase(t *testing.T) {
	path := newDB(t, `PRAGMA journal_mode=WAL`, contractSchema, rowA)
	s := mustOpenStore(t, path)
	reports := watch(t, s, DefaultPoll, 0)

	writer, err := sql.Open(sqliteDriver, path)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	if _, err := writer.Exec(`UPDATE backends SET weight = 7 WHERE id = 'a'`); err != nil {
		t.Fatal(err)
	}
	res, _ := awaitReport(t, reports, time.Second)
	if res.Err != nil || !res.Changed || s.Current().Backends[0].Weight != 7 {
		t.Errorf("report %+v", res)
	}
}
