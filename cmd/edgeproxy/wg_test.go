package main

import (
	"bytes"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/overlay"
	"github.com/edgeproxy/edgeproxy/routing"
)

func mapEnv(m map[string]string) env {
	return env{lookup: func(k string) (string, bool) { v, ok := m[k]; return v, ok }}
}

func TestStartOverlayOff(t *testing.T) {
	tests := []struct {
		name    string
		vars    map[string]string
		wantErr string
	}{
		{"interface set to empty turns it off", map[string]string{"EDGEPROXY_WG_INTERFACE": ""}, ""},
		{"no key with the default interface leaves it off", map[string]string{}, ""},
		{"an interface named without a key is an error", map[string]string{"EDGEPROXY_WG_INTERFACE": "wg-x"}, "no EDGEPROXY_WG_PRIVATE_KEY_FILE"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ov, err := startOverlay(mapEnv(tc.vars), filepath.Join(t.TempDir(), "none.db"), slog.New(slog.DiscardHandler))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one saying %q", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if ov.On || ov.Collector != nil || ov.LoadOptions.HostAddrs != nil {
				t.Errorf("overlay %+v, want off", ov)
			}
			// Off, the hooks are still safe to call unconditionally.
			ov.OnTable(nil)
			ov.Close()
		})
	}
}

func TestApplyLoggedLogsEachDistinctErrorOnce(t *testing.T) {
	e1, e2 := errors.New("route conflict on 10.80.0.0/16"), errors.New("endpoint does not resolve")
	tests := []struct {
		name      string
		results   []error
		wantLines int
	}{
		{"success logs nothing", []error{nil, nil}, 0},
		{"the same error twice is one line", []error{e1, e1}, 1},
		{"an error back after a success is logged again", []error{e1, nil, e1}, 2},
		{"a different error is logged", []error{e1, e2, e2}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			calls := 0
			apply := func(*routing.Table) error { calls++; return tc.results[calls-1] }
			onTable := applyLogged(apply, "wg-test", slog.New(slog.NewTextHandler(&buf, nil)))
			for range tc.results {
				onTable(&routing.Table{})
			}
			if got := strings.Count(buf.String(), "wireguard reconcile incomplete"); got != tc.wantLines || calls != len(tc.results) {
				t.Errorf("%d lines after %d calls, want %d lines:\n%s", got, calls, tc.wantLines, buf.String())
			}
		})
	}
}

// TestStartOverlayFollowsTables opens the overlay in a namespace as `run`
// would, and checks that the first apply comes from routing.db and later
// ones from the tables handed to OnTable.
func TestStartOverlayFollowsTables(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNS(t, "wgo")
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	priv, err := overlay.WriteKeyFile(keyFile, false)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	iface := "wgo" + hex.EncodeToString(b)
	dbPath := filepath.Join(dir, "routing.db")
	db, err := sql.Open("sqlite", dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := routing.InitSchema(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	peerKey := func(n byte) string {
		var k routing.WGKey
		for i := range k {
			k[i] = n
		}
		return k.String()
	}
	if _, err := db.Exec(`INSERT INTO pops VALUES ('me', 'sa', ?, '', '10.50.9.1', '10.50.9.1/32', 0),
		('peer-1', 'sa', ?, '192.0.2.5:51820', '10.50.5.1', '10.50.5.1/32', 0)`, priv.PublicKey().String(), peerKey(5)); err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{
		"EDGEPROXY_WG_INTERFACE":        iface,
		"EDGEPROXY_WG_PRIVATE_KEY_FILE": keyFile,
		"EDGEPROXY_WG_LISTEN_PORT":      "51997",
		"EDGEPROXY_WG_ADDRESS":          "10.50.9.1/16",
		"EDGEPROXY_POP_ID":              "me",
	}
	logs := &syncBuffer{}
	var ov overlayRun
	if err := ns.Do(func() (err error) {
		ov, err = startOverlay(mapEnv(vars), dbPath, slog.New(slog.NewTextHandler(logs, nil)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ov.Close()
		if t.Failed() {
			t.Logf("log:\n%s", logs.String())
		}
	})
	if !ov.On || ov.LoadOptions.PopID != "me" || ov.LoadOptions.HostAddrs == nil || ov.Collector == nil {
		t.Fatalf("overlay %+v, want on, with PopID me, HostAddrs and a collector", ov)
	}
	peers := func() []string {
		var ids []string
		if err := ns.Do(func() error {
			st, err := overlay.ReadStatus(iface, nil)
			for _, p := range st.Peers {
				ids = append(ids, p.PublicKey)
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		slices.Sort(ids)
		return ids
	}
	steps := []struct {
		name string
		stmt string
		want []string
	}{
		{"the first apply reads routing.db", "", []string{peerKey(5)}},
		{"a table with a new peer adds it", `INSERT INTO pops VALUES ('peer-2', 'sa', '` + peerKey(6) + `', '', '10.50.6.1', '10.50.6.1/32', 0)`, []string{peerKey(5), peerKey(6)}},
		{"a table without the first peer removes it", `UPDATE pops SET deleted = 1 WHERE id = 'peer-1'`, []string{peerKey(6)}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			if st.stmt != "" {
				if _, err := db.Exec(st.stmt); err != nil {
					t.Fatal(err)
				}
				tbl, _, err := routing.LoadTableWith(dbPath, ov.LoadOptions)
				if err != nil {
					t.Fatal(err)
				}
				ov.OnTable(tbl)
			}
			want := slices.Clone(st.want)
			slices.Sort(want)
			if got := peers(); !slices.Equal(got, want) {
				t.Errorf("peers %v, want %v", got, want)
			}
		})
	}
}

// syncBuffer is a log sink the device's goroutines may write to.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
