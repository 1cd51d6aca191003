package routing

import (
	"context"
	"database/sql"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// Every parser of outside input is fuzzed here: routing.db rows of the
// backends, regions and pops tables, and the geo database. A short run of
// each is part of `make test` (see the Makefile's fuzz target); the seeds in
// testdata/fuzz are committed, and a crash found becomes one of them.

// fuzzDB writes one row to each table of a fresh routing.db. The values go
// in as text, so SQLite's column affinity turns numeric text into integers
// and leaves the rest as text: the loader sees both kinds, as it does in the
// field where operators write rows by hand.
func fuzzDB(t *testing.T, backend, region, pop []any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "routing.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	if err := InitSchema(ctx, db); err != nil {
		t.Fatal(err)
	}
	for _, ins := range []struct {
		stmt string
		vals []any
	}{
		{`INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted) VALUES (?,?,?,?,?,?,?,?,?,?,?)`, backend},
		{`INSERT INTO regions (country, region) VALUES (?,?)`, region},
		{`INSERT INTO pops (id, region, wg_public_key, endpoint, wg_ip, allowed_ips, deleted) VALUES (?,?,?,?,?,?,?)`, pop},
	} {
		if _, err := db.ExecContext(ctx, ins.stmt, ins.vals...); err != nil {
			// A NOT NULL or PRIMARY KEY the fuzzer broke: SQLite refused
			// the row, so there is nothing for the loader to read.
			t.Skipf("sqlite refused the row: %v", err)
		}
	}
	return path
}

func FuzzLoadTable(f *testing.F) {
	f.Add("b1", "app", "eu", "FR", "10.0.0.1", "8080", "1", "2", "10", "20", "0", "FR", "eu")
	f.Add("b2", "", "sa", "br", "fe80::1%eth0", "65535", "0", "", "", "", "", "BR", "sa")
	f.Add("", "x", "", "", "::", "0", "yes", "-1", "5", "1", "1", "", "")
	f.Add("b3", "app", "eu", "FR", "::ffff:10.0.0.1", "70000", "1.5", "0x10", "3", "2", "2", "fr ", "EU")
	f.Add(strings.Repeat("x", 48), "a", "r", "c", "224.0.0.1", "1", "1", "1", "1", "1", "0", "DE", "")
	f.Fuzz(func(t *testing.T, id, app, region, country, wgIP, port, healthy, weight, soft, hard, deleted, regCountry, regRegion string) {
		path := fuzzDB(t,
			[]any{id, app, region, country, wgIP, port, healthy, weight, soft, hard, deleted},
			[]any{regCountry, regRegion},
			[]any{"p1", "eu", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "", "10.9.0.1", "10.9.0.0/24", 0})
		table, rowErrs, err := LoadTableWith(path, LoadOptions{})
		if err != nil {
			t.Fatalf("a routing.db with the contract's schema must load, rows errors aside: %v", err)
		}
		for _, re := range rowErrs {
			checkRowError(t, re)
		}
		switch {
		case len(table.Backends) == 1:
			checkBackend(t, table.Backends[0])
		case len(table.Deleted) == 1:
		case len(rowErrs) == 0:
			t.Fatalf("row %q neither loaded, marked deleted nor reported", id)
		}
		for country, region := range table.Regions {
			if country != strings.ToUpper(country) || country == "" || region == "" {
				t.Fatalf("regions map holds %q -> %q", country, region)
			}
		}
	})
}

func checkRowError(t *testing.T, re RowError) {
	t.Helper()
	switch re.Table {
	case "backends", "regions", popsTable:
	default:
		t.Fatalf("row error names table %q: %v", re.Table, re)
	}
	if re.Reason == "" {
		t.Fatalf("row error without a reason: %#v", re)
	}
	if re.Error() == "" {
		t.Fatal("row error prints as nothing")
	}
}

// checkBackend holds a loaded backend to the rules the loader promises, so
// a rule that stops being enforced shows up as a fuzz failure.
func checkBackend(t *testing.T, b Backend) {
	t.Helper()
	if reason := checkID(b.ID); reason != "" {
		t.Fatalf("loaded backend id %q %s", b.ID, reason)
	}
	if !b.Addr.IsValid() || b.Addr.Is4In6() {
		t.Fatalf("loaded backend %q has address %v", b.ID, b.Addr)
	}
	if reason := checkBackendAddr(b.Addr); reason != "" {
		t.Fatalf("loaded backend %q address %v %s", b.ID, b.Addr, reason)
	}
	if b.Port == 0 {
		t.Fatalf("loaded backend %q has port 0", b.ID)
	}
	if b.Weight < 0 || b.SoftLimit < 0 || b.HardLimit < 0 {
		t.Fatalf("loaded backend %q has a negative limit: %+v", b.ID, b)
	}
	if b.SoftLimit > 0 && b.HardLimit > 0 && b.SoftLimit > b.HardLimit {
		t.Fatalf("loaded backend %q has soft_limit above hard_limit: %+v", b.ID, b)
	}
}

func FuzzLoadPops(f *testing.F) {
	key := "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	f.Add("p1", "eu", key, "192.0.2.1:51820", "10.9.0.1", "10.9.0.0/24", "0")
	f.Add("p2", "sa", key, "", "fd00::1", "fd00::/64,10.8.0.0/16", "")
	f.Add("p3", "", "short", "host:99999", "10.9.0.1", "10.9.0.0/33", "1")
	f.Add("p4", "eu", key, "[::1]:51820", "10.1.0.1", "10.9.0.0/24", "x")
	f.Fuzz(func(t *testing.T, id, region, publicKey, endpoint, wgIP, allowedIPs, deleted string) {
		path := fuzzDB(t,
			[]any{"b1", "app", "eu", "FR", "10.0.0.1", 8080, 1, 1, 1, 1, 0},
			[]any{"FR", "eu"},
			[]any{id, region, publicKey, endpoint, wgIP, allowedIPs, deleted})
		pops, rowErrs, err := LoadPops(path, LoadOptions{})
		if err != nil {
			t.Fatalf("a routing.db with the contract's schema must load, rows errors aside: %v", err)
		}
		for _, re := range rowErrs {
			checkRowError(t, re)
		}
		for _, p := range pops {
			if reason := checkID(p.ID); reason != "" {
				t.Fatalf("loaded pop id %q %s", p.ID, reason)
			}
			covered := false
			for _, pfx := range p.AllowedIPs {
				if pfx != pfx.Masked() {
					t.Fatalf("pop %q allowed_ips %v not masked", p.ID, pfx)
				}
				covered = covered || pfx.Contains(p.WGIP)
			}
			if !covered {
				t.Fatalf("pop %q wg_ip %v outside its allowed_ips %v", p.ID, p.WGIP, p.AllowedIPs)
			}
		}
		// The row parser for tools agrees with the loader on this row
		// (it has no deleted column, so a row refused for that alone is
		// not compared).
		deletedRefused := false
		for _, re := range rowErrs {
			deletedRefused = deletedRefused || re.Column == "deleted"
		}
		if _, err := ParsePopRow(id, region, publicKey, endpoint, wgIP, allowedIPs); err == nil && len(pops) == 0 && !deletedRefused && !truthyText(deleted) {
			t.Fatalf("ParsePopRow accepts pop %q that LoadPops dropped: %v", id, rowErrs)
		}
	})
}

func truthyText(s string) bool {
	s = strings.TrimSpace(s)
	return s != "" && s != "0"
}

func FuzzOpenGeo(f *testing.F) {
	f.Add(mmdb(f, "GeoLite2-Country", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) })))
	f.Add(mmdb(f, "ip-location-db", testRecords(ipLocationDBRecord)))
	f.Add([]byte("\xab\xcd\xefMaxMind.com"))
	f.Add([]byte{})
	probes := []netip.Addr{
		netip.MustParseAddr("81.2.69.1"), netip.MustParseAddr("89.160.20.1"),
		netip.MustParseAddr("2a02:cf40::1"), netip.MustParseAddr("::ffff:81.2.69.1"),
		netip.MustParseAddr("10.0.0.1"), netip.IPv6Unspecified(),
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		g, err := openGeoBytes(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("a refused geo database gives no reason")
			}
			return
		}
		defer g.Close()
		for _, a := range probes {
			// Routing compares countries upper-cased; whatever the
			// file holds comes back that way.
			if c := g.Country(a); c != strings.ToUpper(c) {
				t.Fatalf("country of %v is %q: not upper-cased", a, c)
			}
		}
		_ = g.Describe()
	})
}
