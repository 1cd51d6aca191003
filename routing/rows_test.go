package routing

import (
	"database/sql"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
)

const rowsTestKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

func TestBackendJSONRoundTripsThroughTheRowRules(t *testing.T) {
	b := Backend{ID: "sa-br-1", App: "web", Region: "sa", Country: "BR", Addr: netip.MustParseAddr("10.0.0.1"), Port: 9001,
		Healthy: true, Weight: 2, SoftLimit: 10, HardLimit: 20}
	got, err := ParseBackendJSON("sa-br-1", MarshalBackend(b))
	if err != nil {
		t.Fatal(err)
	}
	if got != b {
		t.Fatalf("round trip: got %+v, want %+v", got, b)
	}
}

func TestBackendJSONRefusesWhatARowWould(t *testing.T) {
	cases := []struct {
		name, id, value, column, reason string
	}{
		{"port out of range", "a", `{"wg_ip":"10.0.0.1","port":70000}`, "port", "1-65535"},
		{"address not an IP", "a", `{"wg_ip":"nope","port":80}`, "wg_ip", "IP address"},
		{"soft above hard", "a", `{"wg_ip":"10.0.0.1","port":80,"soft_limit":5,"hard_limit":2}`, "soft_limit", "hard_limit"},
		{"weight fractional", "a", `{"wg_ip":"10.0.0.1","port":80,"weight":1.5}`, "weight", "integer"},
		{"id of the value differs from the key", "a", `{"id":"b","wg_ip":"10.0.0.1","port":80}`, "id", "key"},
		{"id too long for the BPF maps", strings.Repeat("x", 48), `{"wg_ip":"10.0.0.1","port":80}`, "id", "at most 47"},
		{"unknown column", "a", `{"wg_ip":"10.0.0.1","port":80,"wieght":1}`, "wieght", "no such column"},
		{"deleted is not a JSON column", "a", `{"wg_ip":"10.0.0.1","port":80,"deleted":1}`, "deleted", "delete the key"},
		{"not an object", "a", `[1,2]`, jsonColumn, "JSON object"},
		{"not JSON", "a", `port=80`, jsonColumn, "JSON object"},
		{"two objects", "a", `{"wg_ip":"10.0.0.1","port":80}{}`, jsonColumn, "more after it"},
		{"nested value", "a", `{"wg_ip":{"v":1},"port":80}`, "wg_ip", "must be a number, text"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseBackendJSON(c.id, []byte(c.value))
			var re RowError
			if !errors.As(err, &re) {
				t.Fatalf("got %v, want a RowError", err)
			}
			if !strings.Contains(err.Error(), "column "+c.column+":") || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("got %q, want column %s and %q", err, c.column, c.reason)
			}
		})
	}
}

func TestBackendJSONReadsColumnsAsSQLiteWould(t *testing.T) {
	// Numeric text, integral reals and booleans are integers in a row;
	// a missing column is NULL (healthy NULL: not healthy).
	b, err := ParseBackendJSON("a", []byte(`{"wg_ip":"10.0.0.1","port":"8080","weight":2.0,"healthy":true}`))
	if err != nil {
		t.Fatal(err)
	}
	if b.Port != 8080 || b.Weight != 2 || !b.Healthy {
		t.Fatalf("got %+v", b)
	}
	b, err = ParseBackendJSON("a", []byte(`{"wg_ip":"10.0.0.1","port":80}`))
	if err != nil || b.Healthy {
		t.Fatalf("healthy left out: got %+v, %v; want not healthy", b, err)
	}
}

func TestPopJSON(t *testing.T) {
	p, err := ParsePopJSON("pop-b", []byte(`{"wg_public_key":"`+rowsTestKey+`","endpoint":"192.0.2.1:51820","wg_ip":"10.50.2.1","allowed_ips":"10.50.2.1/32, 10.60.2.0/24"}`))
	if err != nil {
		t.Fatal(err)
	}
	again, err := ParsePopJSON("pop-b", MarshalPop(p))
	if err != nil || again.Endpoint != p.Endpoint || joinPrefixes(again.AllowedIPs) != "10.50.2.1/32,10.60.2.0/24" || again.PublicKey != p.PublicKey {
		t.Fatalf("round trip: %+v, %v", again, err)
	}
	_, err = ParsePopJSON("pop-b", []byte(`{"wg_public_key":"`+rowsTestKey+`","wg_ip":"10.50.2.1","allowed_ips":"10.50.3.0/24"}`))
	if err == nil || !strings.Contains(err.Error(), "does not contain wg_ip") {
		t.Fatalf("wg_ip outside allowed_ips: got %v", err)
	}
}

func TestRegionJSON(t *testing.T) {
	c, r, err := ParseRegionJSON("br", MarshalRegion("BR", "EU"))
	if err != nil || c != "BR" || r != "eu" {
		t.Fatalf("got %q %q %v", c, r, err)
	}
	if _, _, err := ParseRegionJSON("BR", []byte(`{"region":""}`)); err == nil || !strings.Contains(err.Error(), "column region") {
		t.Fatalf("empty region: got %v", err)
	}
	if _, _, err := ParseRegionJSON("BR", []byte(`{"country":"AR","region":"sa"}`)); err == nil {
		t.Fatal("a value naming another country than its key was accepted")
	}
}

func TestApplyChangesAndReplaceRows(t *testing.T) {
	path := filepath.Join(t.TempDir(), "routing.db")
	a := Backend{ID: "a", Addr: netip.MustParseAddr("10.0.0.1"), Port: 80, Healthy: true}
	b := Backend{ID: "b", Addr: netip.MustParseAddr("10.0.0.2"), Port: 80, Healthy: true, Country: "BR", Region: "sa"}
	pop, err := ParsePopJSON("pop-b", []byte(`{"wg_public_key":"`+rowsTestKey+`","wg_ip":"10.50.2.1","allowed_ips":"10.50.2.0/24"}`))
	if err != nil {
		t.Fatal(err)
	}
	// The file does not exist yet: the first write creates it with the
	// schema, and a plain load reads what was written.
	if err := ApplyChanges(path, []Change{
		{Table: TableBackends, ID: "a", Backend: &a},
		{Table: TableBackends, ID: "b", Backend: &b},
		{Table: TablePops, ID: "pop-b", Pop: &pop},
		{Table: TableRegions, ID: "br", Region: "EU"},
	}); err != nil {
		t.Fatal(err)
	}
	tbl, rowErrs, err := LoadTable(path)
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("load: %v %v", err, rowErrs)
	}
	if len(tbl.Backends) != 2 || len(tbl.Pops) != 1 || tbl.RegionOf("BR") != "eu" {
		t.Fatalf("after puts: backends %+v, pops %+v, BR in %q", tbl.Backends, tbl.Pops, tbl.RegionOf("BR"))
	}

	// A delete, and a put that replaces a row, in one transaction.
	a.Weight = 7
	if err := ApplyChanges(path, []Change{{Table: TableBackends, ID: "b"}, {Table: TableBackends, ID: "a", Backend: &a}}); err != nil {
		t.Fatal(err)
	}
	tbl, _, _ = LoadTable(path)
	if len(tbl.Backends) != 1 || tbl.Backends[0].Weight != 7 {
		t.Fatalf("after delete b and put a: %+v", tbl.Backends)
	}

	// Replace: what the rows lack goes (the pop, the region, backend a),
	// except what keep holds on to.
	c := Backend{ID: "c", Addr: netip.MustParseAddr("10.0.0.3"), Port: 80}
	removed, err := ReplaceRows(path, Rows{Backends: []Backend{c}}, func(table, id string) bool { return table == TableBackends && id == "a" })
	if err != nil {
		t.Fatal(err)
	}
	if got := changesString(removed); got != "delete pops/pop-b, delete regions/BR" {
		t.Fatalf("removed %s", got)
	}
	rows, rowErrs, err := ReadRows(path)
	if err != nil || len(rowErrs) > 0 {
		t.Fatal(err, rowErrs)
	}
	if len(rows.Backends) != 2 || rows.Backends[0].ID != "a" || rows.Backends[1].ID != "c" || len(rows.Pops) != 0 || len(rows.Regions) != 0 {
		t.Fatalf("after replace: %+v", rows)
	}
}

func TestWriteAddsTheColumnsAnOlderTableLacks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "routing.db")
	db := openTestDB(t, path)
	if _, err := db.Exec(`CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT, region TEXT, wg_ip TEXT, port INTEGER,
		healthy INTEGER, weight INTEGER, soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0)`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	b := Backend{ID: "a", Country: "FR", Addr: netip.MustParseAddr("10.0.0.1"), Port: 80, Healthy: true}
	if err := ApplyChanges(path, []Change{{Table: TableBackends, ID: "a", Backend: &b}}); err != nil {
		t.Fatal(err)
	}
	rows, _, err := ReadRows(path)
	if err != nil || len(rows.Backends) != 1 || rows.Backends[0].Country != "FR" {
		t.Fatalf("got %+v, %v", rows, err)
	}
}

func changesString(cs []Change) string {
	s := make([]string, len(cs))
	for i, c := range cs {
		s[i] = c.String()
	}
	return strings.Join(s, ", ")
}

func openTestDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open(sqliteDriver, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}
