package routing

import (
	"context"
	"database/sql"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const popsSchema = `CREATE TABLE pops (
    id TEXT PRIMARY KEY, region TEXT, wg_public_key TEXT NOT NULL,
    endpoint TEXT, wg_ip TEXT NOT NULL, allowed_ips TEXT NOT NULL,
    deleted INTEGER DEFAULT 0)`

// testKey is a deterministic public key, distinct per n.
func testKey(n byte) WGKey {
	var k WGKey
	for i := range k {
		k[i] = n
	}
	return k
}

// popsDB writes a database with schema (backends only when "") and rows
// inserted into pops with bound values.
func popsDB(t *testing.T, schema string, rows ...[]any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "routing.db")
	db, err := sql.Open(sqliteDriver, path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(contractSchema); err != nil {
		t.Fatal(err)
	}
	if schema != "" {
		if _, err := db.Exec(schema); err != nil {
			t.Fatalf("create pops: %v", err)
		}
	}
	for _, r := range rows {
		marks := strings.TrimSuffix(strings.Repeat("?, ", len(r)), ", ")
		if _, err := db.Exec("INSERT INTO pops VALUES ("+marks+")", r...); err != nil {
			t.Fatalf("insert %v: %v", r, err)
		}
	}
	return path
}

func popIDs(pops []Pop) []string {
	var out []string
	for _, p := range pops {
		out = append(out, p.ID)
	}
	return out
}

func TestLoadPopsValidRows(t *testing.T) {
	path := popsDB(t, popsSchema,
		[]any{"pop-b", "EU", testKey(2).String(), "192.0.2.2:51820", "10.50.2.1", "10.50.2.1/32, 10.60.2.0/24", 0},
		[]any{"pop-a", "sa", testKey(1).String(), "", "10.50.1.1", "10.50.1.1/32", nil},
		[]any{"pop-c", "us", testKey(3).String(), "edge-c.example.net:51820", "fd00::3", "fd00::3/128", 0},
	)
	pops, rowErrs, err := LoadPops(path, LoadOptions{})
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("LoadPops: err %v, row errors %v", err, rowErrs)
	}
	if got := popIDs(pops); !slices.Equal(got, []string{"pop-a", "pop-b", "pop-c"}) {
		t.Fatalf("pops = %v, want sorted by id", got)
	}
	b := pops[1]
	want := Pop{ID: "pop-b", Region: "eu", PublicKey: testKey(2), Endpoint: "192.0.2.2:51820",
		WGIP: netip.MustParseAddr("10.50.2.1"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.50.2.1/32"), netip.MustParsePrefix("10.60.2.0/24")}}
	if b.ID != want.ID || b.Region != want.Region || b.PublicKey != want.PublicKey || b.Endpoint != want.Endpoint || b.WGIP != want.WGIP || !slices.Equal(b.AllowedIPs, want.AllowedIPs) {
		t.Fatalf("pop-b = %+v, want %+v", b, want)
	}
	// The table read with the backends carries the same pops.
	tbl, rowErrs := mustLoad(t, path)
	if len(rowErrs) > 0 || !slices.Equal(popIDs(tbl.Pops), popIDs(pops)) {
		t.Errorf("Table.Pops = %v (row errors %v), want %v", popIDs(tbl.Pops), rowErrs, popIDs(pops))
	}
}

func TestLoadPopsSkipsBadRowsNamingThem(t *testing.T) {
	good := func(id string, n byte, ip string) []any {
		return []any{id, "sa", testKey(n).String(), "", ip, ip + "/32", 0}
	}
	with := func(row []any, col int, v any) []any {
		r := slices.Clone(row)
		r[col] = v
		return r
	}
	long := strings.Repeat("p", MaxIDLen+1)
	tests := []struct {
		name   string
		row    []any
		column string
		reason string
	}{
		{"key not base64", with(good("k1", 1, "10.50.0.1"), 2, "not-a-key!"), "wg_public_key", "must be base64"},
		{"key of 31 bytes", with(good("k2", 2, "10.50.0.2"), 2, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="), "wg_public_key", "decodes to 31 bytes"},
		{"key empty", with(good("k3", 3, "10.50.0.3"), 2, ""), "wg_public_key", "required"},
		{"wg_ip not an address", with(good("ip1", 4, "10.50.0.4"), 4, "10.50.0"), "wg_ip", "must be an IP address"},
		{"wg_ip unspecified", with(with(good("ip2", 20, "10.50.0.20"), 4, "0.0.0.0"), 5, "0.0.0.0/32"), "wg_ip", "must be a unicast address"},
		{"wg_ip with a zone", with(with(good("ip3", 21, "10.50.0.21"), 4, "fe80::1%eth0"), 5, "fe80::1/128"), "wg_ip", "must not have a zone"},
		{"cidr not parsing", with(good("c1", 5, "10.50.0.5"), 5, "10.50.0.5/32,10.60.0.0/33"), "allowed_ips", `"10.60.0.0/33" is not a CIDR prefix`},
		{"cidr with host bits", with(good("c2", 6, "10.50.0.6"), 5, "10.50.0.6/32,10.60.6.1/24"), "allowed_ips", "host bits set: write 10.60.6.0/24 or 10.60.6.1/32"},
		{"no cidr", with(good("c3", 7, "10.50.0.7"), 5, " , "), "allowed_ips", "no prefix"},
		{"wg_ip outside allowed_ips", with(good("c4", 8, "10.50.0.8"), 5, "10.60.8.0/24"), "allowed_ips", "does not contain wg_ip 10.50.0.8: add 10.50.0.8/32"},
		{"IPv4 default route", with(good("r1", 13, "10.50.0.13"), 5, "10.50.0.13/32,0.0.0.0/0"), "allowed_ips", "0.0.0.0/0 is a default route"},
		{"IPv6 default route", with(good("r2", 14, "10.50.0.14"), 5, "::/0,10.50.0.14/32"), "allowed_ips", "::/0 is a default route"},
		{"endpoint without port", with(good("e1", 9, "10.50.0.9"), 3, "192.0.2.9"), "endpoint", "must be host:port"},
		{"endpoint port out of range", with(good("e2", 10, "10.50.0.10"), 3, "192.0.2.10:70000"), "endpoint", `port "70000" is not 1-65535`},
		{"endpoint empty host", with(good("e3", 11, "10.50.0.11"), 3, ":51820"), "endpoint", "with a host"},
		{"endpoint IPv6 without brackets", with(good("e4", 15, "10.50.0.15"), 3, "2001:db8::1:51820"), "endpoint", "IPv6 address in brackets"},
		{"deleted not a number", with(good("d1", 12, "10.50.0.12"), 6, "yes"), "deleted", "must be an integer"},
		// The rule of the backends table: a fraction is a typo, not a
		// deletion (the overlay's own reader used to delete this peer).
		{"deleted a fraction", with(good("d2", 16, "10.50.0.16"), 6, 0.5), "deleted", "must be an integer"},
		{"id longer than the BPF id field", good(long, 17, "10.50.0.17"), "id", "at most 47 fit"},
		{"id not valid UTF-8", good("bad\xff", 18, "10.50.0.18"), "id", "must be valid UTF-8"},
	}
	var rows [][]any
	for _, tc := range tests {
		rows = append(rows, tc.row)
	}
	rows = append(rows, good("ok", 99, "10.50.0.99"))
	pops, rowErrs, err := LoadPops(popsDB(t, popsSchema, rows...), LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := popIDs(pops); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("loaded %v, want only the good row", got)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := tc.row[0].(string)
			for _, re := range rowErrs {
				if re.ID != id {
					continue
				}
				if re.Table != "pops" || re.Column != tc.column || !strings.Contains(re.Reason, tc.reason) {
					t.Fatalf("error %q: want table pops, column %s, reason containing %q", re, tc.column, tc.reason)
				}
				return
			}
			t.Fatalf("no row error for %q in %v", id, rowErrs)
		})
	}
}

func TestLoadPopsHostAddresses(t *testing.T) {
	host := []netip.Addr{
		netip.MustParseAddr("192.168.77.1"),   // the underlay
		netip.MustParseAddr("10.50.1.1"),      // this POP's overlay address
		netip.MustParseAddr("fe80::1%eth0"),   // link-local, with its zone
		netip.MustParseAddr("::ffff:7.7.7.7"), // reported IPv4-mapped
	}
	tests := []struct {
		name    string
		row     []any
		popID   string
		wantErr string // "" when the row loads
	}{
		{"a peer's own prefixes load", []any{"peer", "sa", testKey(1).String(), "", "10.50.2.1", "10.50.2.1/32,10.60.2.0/24", 0}, "me", ""},
		{"a prefix covering the underlay is refused", []any{"peer", "sa", testKey(1).String(), "", "10.50.2.1", "10.50.2.1/32,192.168.0.0/16", 0}, "me",
			"192.168.0.0/16 covers 192.168.77.1, an address of this host"},
		{"a prefix covering this POP's overlay address is refused", []any{"peer", "sa", testKey(1).String(), "", "10.50.2.1", "10.50.0.0/16", 0}, "me",
			"10.50.0.0/16 covers 10.50.1.1, an address of this host"},
		{"a link-local prefix covering a zoned address is refused", []any{"peer", "sa", testKey(1).String(), "", "fe80::2", "fe80::/64", 0}, "me",
			"fe80::/64 covers fe80::1, an address of this host"},
		{"an IPv4-mapped host address is matched as IPv4", []any{"peer", "sa", testKey(1).String(), "", "7.7.7.8", "7.7.7.0/24", 0}, "me",
			"7.7.7.0/24 covers 7.7.7.7, an address of this host"},
		{"this POP's own row covers its own address", []any{"me", "sa", testKey(1).String(), "", "10.50.1.1", "10.50.1.1/32", 0}, "me", ""},
		{"another POP's row with this POP's address is refused", []any{"other", "sa", testKey(1).String(), "", "10.50.1.1", "10.50.1.1/32", 0}, "me",
			"10.50.1.1/32 covers 10.50.1.1, an address of this host"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := popsDB(t, popsSchema, tc.row)
			opts := LoadOptions{PopID: tc.popID, HostAddrs: func() []netip.Addr { return host }}
			for _, load := range []struct {
				name string
				fn   func() ([]Pop, []RowError, error)
			}{
				{"LoadPops", func() ([]Pop, []RowError, error) { return LoadPops(path, opts) }},
				{"LoadTableWith", func() ([]Pop, []RowError, error) {
					tbl, rowErrs, err := LoadTableWith(path, opts)
					if err != nil {
						return nil, nil, err
					}
					return tbl.Pops, rowErrs, nil
				}},
			} {
				pops, rowErrs, err := load.fn()
				if err != nil {
					t.Fatalf("%s: %v", load.name, err)
				}
				if tc.wantErr == "" {
					if len(pops) != 1 || len(rowErrs) != 0 {
						t.Errorf("%s: pops %v, row errors %v; want the row loaded", load.name, popIDs(pops), rowErrs)
					}
					continue
				}
				if len(pops) != 0 || len(rowErrs) != 1 || rowErrs[0].Column != "allowed_ips" || rowErrs[0].Reason != tc.wantErr {
					t.Errorf("%s: pops %v, row errors %v; want it skipped: %s", load.name, popIDs(pops), rowErrs, tc.wantErr)
				}
			}
		})
	}
}

func TestLoadPopsDeletedRowsAreLeftOutSilently(t *testing.T) {
	path := popsDB(t, popsSchema,
		[]any{"gone", "sa", "garbage", "", "nonsense", "", 1},
		[]any{"kept", "sa", testKey(1).String(), "", "10.50.0.1", "10.50.0.1/32", "0"},
	)
	pops, rowErrs, err := LoadPops(path, LoadOptions{})
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("err %v, row errors %v: a deleted row is not validated", err, rowErrs)
	}
	if got := popIDs(pops); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("pops = %v, want [kept]", got)
	}
}

func TestLoadPopsConflicts(t *testing.T) {
	path := popsDB(t, `CREATE TABLE pops (id TEXT, region TEXT, wg_public_key TEXT, endpoint TEXT, wg_ip TEXT, allowed_ips TEXT, deleted INTEGER)`,
		[]any{"a", "sa", testKey(1).String(), "", "10.50.0.1", "10.50.0.1/32,10.60.0.0/16", 0},
		[]any{"b", "sa", testKey(1).String(), "", "10.50.0.2", "10.50.0.2/32", 0},
		[]any{"c", "sa", testKey(3).String(), "", "10.50.0.3", "10.50.0.3/32,10.60.5.0/24", 0},
		[]any{"d", "sa", testKey(4).String(), "", "10.50.0.4", "10.50.0.4/32", 0},
		[]any{"twin", "sa", testKey(5).String(), "", "10.50.0.5", "10.50.0.5/32", 0},
		[]any{"twin", "sa", testKey(6).String(), "", "10.50.0.6", "10.50.0.6/32", 0},
	)
	pops, rowErrs, err := LoadPops(path, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := popIDs(pops); !slices.Equal(got, []string{"a", "d"}) {
		t.Errorf("pops = %v, want [a d]", got)
	}
	var all []string
	for _, re := range rowErrs {
		all = append(all, re.Error())
	}
	tests := []struct{ name, want string }{
		{"a repeated key names the first row", `pops row "b": column wg_public_key: value "` + testKey(1).String() + `": same key as row "a"`},
		{"an overlapping prefix names both", `pops row "c": column allowed_ips: value "10.50.0.3/32,10.60.5.0/24": 10.60.5.0/24 overlaps 10.60.0.0/16 of row "a"`},
		{"a repeated id skips every copy", `pops row "twin": column id: value "twin": duplicate id (2 rows): all skipped`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !slices.Contains(all, tc.want) {
				t.Errorf("row errors %q lack %q", all, tc.want)
			}
		})
	}
}

func TestLoadPopsTableShapes(t *testing.T) {
	tests := []struct {
		name    string
		schema  string
		rows    [][]any
		wantIDs []string
		wantErr string
	}{
		{"no pops table: no pops, no error", "", nil, nil, ""},
		{"only the required columns", `CREATE TABLE pops (id TEXT, wg_public_key TEXT, wg_ip TEXT, allowed_ips TEXT)`,
			[][]any{{"a", testKey(1).String(), "10.50.0.1", "10.50.0.1/32"}}, []string{"a"}, ""},
		{"a required column missing", `CREATE TABLE pops (id TEXT, wg_public_key TEXT, wg_ip TEXT)`, nil, nil, "no column allowed_ips"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := popsDB(t, tc.schema, tc.rows...)
			pops, rowErrs, err := LoadPops(path, LoadOptions{})
			switch {
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), path) {
					t.Errorf("err %v, want one naming %s and saying %q", err, path, tc.wantErr)
				}
			case err != nil || len(rowErrs) > 0 || !slices.Equal(popIDs(pops), tc.wantIDs):
				t.Errorf("got %v, %v, %v; want %v", popIDs(pops), rowErrs, err, tc.wantIDs)
			}
		})
	}
	missing := filepath.Join(t.TempDir(), "nope.db")
	if _, _, err := LoadPops(missing, LoadOptions{}); err == nil || !strings.Contains(err.Error(), "nope.db") {
		t.Errorf("missing file: err %v, want one naming the path", err)
	}
}

func TestParsePopRow(t *testing.T) {
	tests := []struct {
		name      string
		endpoint  string
		allowed   string
		wantErrIn []string // columns with an error; none: the row is valid
	}{
		{"IPv6 endpoint in brackets", "[2001:db8::1]:51820", "10.50.0.7/32", nil},
		{"host name endpoint", "pop.example.net:51820", "10.50.0.7/32", nil},
		{"every bad column is named", "nowhere", "10.60.0.0/24", []string{"endpoint", "allowed_ips"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParsePopRow("x", "sa", testKey(7).String(), tc.endpoint, "10.50.0.7", tc.allowed)
			if len(tc.wantErrIn) == 0 {
				if err != nil || p.Endpoint != tc.endpoint {
					t.Fatalf("got %+v, %v", p, err)
				}
				return
			}
			for _, col := range tc.wantErrIn {
				found := false
				for e := range rowErrorsOf(err) {
					found = found || e.Column == col
				}
				if !found {
					t.Errorf("error %v names no column %s", err, col)
				}
			}
		})
	}
}

// rowErrorsOf yields every RowError err wraps.
func rowErrorsOf(err error) func(func(RowError) bool) {
	return func(yield func(RowError) bool) {
		var re RowError
		if errors.As(err, &re) && !yield(re) {
			return
		}
		var many interface{ Unwrap() []error }
		if errors.As(err, &many) {
			for _, e := range many.Unwrap() {
				if errors.As(e, &re) && !yield(re) {
					return
				}
			}
		}
	}
}

// TestPopsOnlyChangePublishesATable: the overlay follows the routing store,
// so a change to pops alone must come out of Reload as a new table.
func TestPopsOnlyChangePublishesATable(t *testing.T) {
	path := popsDB(t, popsSchema, []any{"a", "sa", testKey(1).String(), "", "10.50.0.1", "10.50.0.1/32", 0})
	writeDB(t, path, rowA)
	s := mustOpenStore(t, path)
	before := s.Current()
	tests := []struct {
		name        string
		stmt        string
		wantChanged bool
	}{
		{"an unrelated write changes nothing", `UPDATE pops SET region = 'sa' WHERE id = 'a'`, false},
		{"a new endpoint is a new table", `UPDATE pops SET endpoint = '192.0.2.1:51820' WHERE id = 'a'`, true},
		{"a new allowed prefix is a new table", `UPDATE pops SET allowed_ips = '10.50.0.1/32,10.70.0.0/16' WHERE id = 'a'`, true},
		{"a new key is a new table", `UPDATE pops SET wg_public_key = '` + testKey(2).String() + `' WHERE id = 'a'`, true},
		{"a deleted pop is a new table", `UPDATE pops SET deleted = 1 WHERE id = 'a'`, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			writeDB(t, path, tc.stmt)
			res := s.Reload()
			if res.Err != nil || res.Changed != tc.wantChanged {
				t.Fatalf("Reload = %+v, want changed %v", res, tc.wantChanged)
			}
		})
	}
	after := s.Current()
	if after.Version == before.Version || len(after.Pops) != 0 || !slices.Equal(ids(after), ids(before)) {
		t.Errorf("after: version %x (before %x), pops %v, backends %v", after.Version, before.Version, popIDs(after.Pops), ids(after))
	}
}

func TestVersionWithoutPopsIsUnchangedByThem(t *testing.T) {
	bs := []Backend{{ID: "a", Addr: netip.MustParseAddr("10.0.0.1"), Port: 80}}
	plain, err := NewTable(bs, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	empty, err := NewTableWithPops(bs, nil, nil, []Pop{})
	if err != nil {
		t.Fatal(err)
	}
	withPop, err := NewTableWithPops(bs, nil, nil, []Pop{{ID: "p", PublicKey: testKey(1)}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		a, b      *Table
		wantEqual bool
	}{
		{"no pops and an empty pops list hash alike", plain, empty, true},
		{"a pop changes the version", plain, withPop, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if (tc.a.Version == tc.b.Version) != tc.wantEqual {
				t.Errorf("versions %x and %x, want equal %v", tc.a.Version, tc.b.Version, tc.wantEqual)
			}
		})
	}
}

func TestInitSchemaMatchesTheReader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "routing.db")
	db, err := sql.Open(sqliteDriver, path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	for i := range 2 { // the second run finds every table and changes nothing
		if err := InitSchema(ctx, db); err != nil {
			t.Fatalf("InitSchema run %d: %v", i+1, err)
		}
	}
	if _, err := db.Exec(`INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit)
		VALUES ('b', 'x', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20)`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO pops (id, region, wg_public_key, endpoint, wg_ip, allowed_ips)
		VALUES ('p', 'sa', ?, '', '10.50.0.1', '10.50.0.1/32')`, testKey(1).String()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO regions VALUES ('XX', 'eu')`); err != nil {
		t.Fatal(err)
	}
	tbl, rowErrs := mustLoad(t, path)
	tests := []struct {
		name string
		ok   bool
	}{
		{"no row is skipped", len(rowErrs) == 0},
		{"the backend loads with deleted defaulting to 0", slices.Equal(ids(tbl), []string{"b"})},
		{"the pop loads", slices.Equal(popIDs(tbl.Pops), []string{"p"})},
		{"the region override applies", tbl.RegionOf("XX") == "eu"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.ok {
				t.Errorf("backends %v, pops %v, row errors %v", ids(tbl), popIDs(tbl.Pops), rowErrs)
			}
		})
	}
}
