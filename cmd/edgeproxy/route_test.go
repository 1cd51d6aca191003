package main

import (
	"database/sql"
	"path/filepath"
	"strings"
	"testing"
)

// TestRouteShowsEverySkippedRow: a row missing from the decision is
// explained in the same output, whichever table it came from.
func TestRouteShowsEverySkippedRow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "routing.db")
	if _, _, code := run(t, nil, "db", "init", "--db", path); code != 0 {
		t.Fatal("db init failed")
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 48)
	for _, stmt := range []string{
		`INSERT INTO backends VALUES ('ok', 'a', 'us', 'US', '127.0.0.1', 9001, 1, 1, 10, 20, 0)`,
		`INSERT INTO backends VALUES ('soft-above-hard', 'a', 'us', 'US', '127.0.0.1', 9002, 1, 1, 30, 20, 0)`,
		`INSERT INTO backends VALUES ('` + long + `', 'a', 'us', 'US', '127.0.0.1', 9003, 1, 1, 10, 20, 0)`,
		`INSERT INTO backends VALUES ('no-zone', 'a', 'us', 'US', 'fe80::1', 9004, 1, 1, 10, 20, 0)`,
		`INSERT INTO pops VALUES ('everything', 'us', 'AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=', '', '10.50.0.1', '0.0.0.0/0', 0)`,
	} {
		if _, err := db.Exec(stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	db.Close()

	out, stderr, code := run(t, nil, "route", "--db", path, "--admin", "", "8.8.8.8")
	if code != 0 {
		t.Fatalf("route: exit %d: %s", code, stderr)
	}
	tests := []struct{ name, want string }{
		{"the geo database is named with its file", "(geo database: embedded (geo-whois-asn-country "},
		{"the good row wins", "winner: ok at 127.0.0.1:9001"},
		{"the count of skipped rows", "4 rows skipped"},
		{"a soft limit above the hard limit", `skipped: backends row "soft-above-hard": column soft_limit: value "30": must not exceed hard_limit 20`},
		{"an id too long for the BPF maps", `skipped: backends row "` + long + `": column id: value "` + long + `": is 48 bytes long, at most 47 fit the BPF maps' id field`},
		{"a link-local address without a zone", `skipped: backends row "no-zone": column wg_ip: value "fe80::1": a link-local address needs a zone naming its interface, e.g. fe80::1%eth0`},
		{"a pops row with a default route", `skipped: pops row "everything": column allowed_ips: value "0.0.0.0/0": 0.0.0.0/0 is a default route`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(out, tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, out)
			}
		})
	}
}
