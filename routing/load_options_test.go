package routing

import (
	"net/netip"
	"slices"
	"testing"
)

func TestLoadKeepsTheZoneOfALinkLocalBackend(t *testing.T) {
	tests := []struct {
		name, wgIP, wantAddrPort string
	}{
		{"zone by name", "fe80::1%eth0", "[fe80::1%eth0]:80"},
		{"zone by index", "fe80::1%2", "[fe80::1%2]:80"},
		{"IPv4-mapped stays unmapped", "::ffff:10.0.0.5", "10.0.0.5:80"},
		{"IPv4 link-local needs no zone", "169.254.1.1", "169.254.1.1:80"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tbl, rowErrs := mustLoad(t, newDB(t, contractSchema,
				`INSERT INTO backends VALUES ('b', 'a', 'sa', 'BR', '`+tc.wgIP+`', 80, 1, 1, 10, 20, 0)`))
			if len(rowErrs) != 0 || len(tbl.Backends) != 1 {
				t.Fatalf("backends %v, row errors %v", ids(tbl), rowErrs)
			}
			if got := tbl.Backends[0].AddrPort().String(); got != tc.wantAddrPort {
				t.Errorf("AddrPort = %s, want %s", got, tc.wantAddrPort)
			}
		})
	}
}

func TestVersionDependsOnTheZone(t *testing.T) {
	load := func(wgIP string) uint64 {
		tbl, rowErrs := mustLoad(t, newDB(t, contractSchema,
			`INSERT INTO backends VALUES ('b', 'a', 'sa', 'BR', '`+wgIP+`', 80, 1, 1, 10, 20, 0)`))
		if len(rowErrs) != 0 {
			t.Fatalf("row errors %v", rowErrs)
		}
		return tbl.Version
	}
	if load("fe80::1%eth0") == load("fe80::1%eth1") {
		t.Error("fe80::1 with zones eth0 and eth1 gives the same version: a move to another link would not be published")
	}
}

func TestIsSelfSkipsTheProxysOwnAddressOnEveryLoad(t *testing.T) {
	self := netip.MustParseAddrPort("10.0.0.9:8080")
	opts := LoadOptions{IsSelf: func(ap netip.AddrPort) bool { return ap == self }}
	tests := []struct {
		name     string
		rows     []string
		wantIDs  []string
		wantErrs []RowError
	}{
		{"the proxy's own address and port is skipped",
			[]string{`('loop', 'a', 'sa', 'BR', '10.0.0.9', 8080, 1, 1, 10, 20, 0)`, `('ok', 'a', 'sa', 'BR', '10.0.0.9', 8081, 1, 1, 10, 20, 0)`},
			[]string{"ok"},
			[]RowError{{"backends", "loop", "wg_ip", "10.0.0.9", "10.0.0.9:8080 is this proxy's own listen address"}}},
		{"written IPv4-mapped it is still the proxy",
			[]string{`('loop', 'a', 'sa', 'BR', '::ffff:10.0.0.9', 8080, 1, 1, 10, 20, 0)`},
			nil,
			[]RowError{{"backends", "loop", "wg_ip", "::ffff:10.0.0.9", "10.0.0.9:8080 is this proxy's own listen address"}}},
		{"a deleted row pointing at the proxy is only deleted",
			[]string{`('loop', 'a', 'sa', 'BR', '10.0.0.9', 8080, 1, 1, 10, 20, 1)`},
			nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			stmts := []string{contractSchema}
			for _, r := range tc.rows {
				stmts = append(stmts, "INSERT INTO backends VALUES "+r)
			}
			path := newDB(t, stmts...)
			s, err := OpenStoreWith(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			check := func(when string, tbl *Table, rowErrs []RowError) {
				if !slices.Equal(ids(tbl), tc.wantIDs) || !slices.Equal(rowErrs, tc.wantErrs) {
					t.Errorf("%s: backends %v, row errors %v; want %v and %v", when, ids(tbl), rowErrs, tc.wantIDs, tc.wantErrs)
				}
			}
			check("first load", s.Current(), s.RowErrors())
			// A reload that publishes a new table applies the option too.
			writeDB(t, path, regionsSchema, `INSERT INTO regions VALUES ('XX', 'eu')`)
			res := s.Reload()
			if res.Err != nil || !res.Changed {
				t.Fatalf("reload: %+v, want a new table", res)
			}
			check("reload", res.Table, res.RowErrors)
		})
	}
	// Without the option the same row loads: routing itself cannot know.
	tbl, rowErrs := mustLoad(t, newDB(t, contractSchema, `INSERT INTO backends VALUES ('loop', 'a', 'sa', 'BR', '10.0.0.9', 8080, 1, 1, 10, 20, 0)`))
	if len(rowErrs) != 0 || len(tbl.Backends) != 1 {
		t.Errorf("without IsSelf: backends %v, row errors %v", ids(tbl), rowErrs)
	}
}
