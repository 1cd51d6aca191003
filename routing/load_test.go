package routing

import (
	"database/sql"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const (
	contractSchema = `CREATE TABLE backends (
		id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT,
		wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER,
		soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0)`
	// seedSchema is the seed's older table: no country column.
	seedSchema = `CREATE TABLE backends (
		id TEXT PRIMARY KEY, app TEXT, region TEXT,
		wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER,
		soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0)`
	regionsSchema = `CREATE TABLE regions (country TEXT PRIMARY KEY, region TEXT NOT NULL)`
)

// writeDB creates a database at path by running stmts on a read-write
// connection, the way an operator's sqlite3 shell would.
func writeDB(t testing.TB, path string, stmts ...string) {
	t.Helper()
	db, err := sql.Open(sqliteDriver, "file:"+uriPathEscaper.Replace(path))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, s := range stmts {
		if _, err := db.Exec(s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
}

// newDB is writeDB at a fresh path.
func newDB(t testing.TB, stmts ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "routing.db")
	writeDB(t, path, stmts...)
	return path
}

func mustLoad(t *testing.T, path string) (*Table, []RowError) {
	t.Helper()
	tbl, rowErrs, err := LoadTable(path)
	if err != nil {
		t.Fatalf("LoadTable: %v", err)
	}
	return tbl, rowErrs
}

func ids(tbl *Table) []string {
	var out []string
	for _, b := range tbl.Backends {
		out = append(out, b.ID)
	}
	return out
}

func TestLoadContractSchema(t *testing.T) {
	path := newDB(t, contractSchema,
		`INSERT INTO backends VALUES
			('sa-1', 'shop', 'sa', 'BR', '10.50.1.1', 8080, 1, 2, 100, 150, 0),
			('eu-1', 'shop', 'EU', 'fr', '2001:db8::1', 443, 0, 1, 10, 0, 0),
			('gone', 'shop', 'us', 'US', '10.50.3.1', 8080, 1, 1, 10, 20, 1),
			('mapped', 'shop', 'us', 'US', '::ffff:10.50.3.2', 9000, 1, 0, 0, 0, 0)`)
	tbl, rowErrs := mustLoad(t, path)
	if len(rowErrs) != 0 {
		t.Fatalf("row errors: %v", rowErrs)
	}
	want := []Backend{
		{ID: "eu-1", App: "shop", Region: "eu", Country: "FR", Addr: netip.MustParseAddr("2001:db8::1"), Port: 443, Weight: 1, SoftLimit: 10},
		{ID: "mapped", App: "shop", Region: "us", Country: "US", Addr: netip.MustParseAddr("10.50.3.2"), Port: 9000, Healthy: true},
		{ID: "sa-1", App: "shop", Region: "sa", Country: "BR", Addr: netip.MustParseAddr("10.50.1.1"), Port: 8080, Healthy: true, Weight: 2, SoftLimit: 100, HardLimit: 150},
	}
	if !slices.Equal(tbl.Backends, want) {
		t.Errorf("backends:\n got %+v\nwant %+v", tbl.Backends, want)
	}
	if !slices.Equal(tbl.Deleted, []string{"gone"}) {
		t.Errorf("deleted = %v, want [gone]", tbl.Deleted)
	}
	if tbl.LoadedAt.IsZero() || tbl.Version == 0 {
		t.Errorf("LoadedAt %v, Version %x: want both set", tbl.LoadedAt, tbl.Version)
	}
}

func TestLoadSeedSchemaWithoutCountry(t *testing.T) {
	path := newDB(t, seedSchema,
		`INSERT INTO backends VALUES
			('sa-node-1', 'myapp', 'sa', '10.50.1.1', 8080, 1, 2, 100, 150, 0),
			('us-node-1', 'myapp', 'us', '10.50.2.1', 8080, 1, 2, 100, 150, 0)`)
	tbl, rowErrs := mustLoad(t, path)
	if len(rowErrs) != 0 || !slices.Equal(ids(tbl), []string{"sa-node-1", "us-node-1"}) {
		t.Fatalf("got %v, row errors %v", ids(tbl), rowErrs)
	}
	for _, b := range tbl.Backends {
		if b.Country != "" {
			t.Errorf("%s: country = %q, want empty", b.ID, b.Country)
		}
	}
	// Without countries, a Brazilian client still lands in its region.
	in := Input{Client: Client{Country: "BR", Region: "sa"}, LocalRegion: "us"}
	if w, _, _ := Pick(&in, tbl); w < 0 || tbl.Backends[w].ID != "sa-node-1" {
		t.Errorf("winner %d, want sa-node-1", w)
	}
}

func TestLoadNullsReadAsNeutralValues(t *testing.T) {
	path := newDB(t, contractSchema,
		`INSERT INTO backends VALUES ('nulls', NULL, NULL, NULL, '10.0.0.9', 80, NULL, NULL, NULL, NULL, NULL)`,
		`INSERT INTO backends VALUES ('text-numbers', 'a', 'sa', 'BR', ' 10.0.0.8 ', '8080', '1', '3', 5.0, '10', '0')`,
		`INSERT INTO backends VALUES ('healthy-two', 'a', 'sa', 'BR', '10.0.0.7', 80, 2, 1, 1, 1, 0)`)
	tbl, rowErrs := mustLoad(t, path)
	if len(rowErrs) != 0 {
		t.Fatalf("row errors: %v", rowErrs)
	}
	nulls := tbl.Backends[tbl.Index("nulls")]
	if nulls.Healthy || nulls.Weight != 0 || nulls.SoftLimit != 0 || nulls.HardLimit != 0 || nulls.App != "" || nulls.Region != "" || nulls.Country != "" {
		t.Errorf("NULL row = %+v; want unhealthy, zero limits, empty texts", nulls)
	}
	text := tbl.Backends[tbl.Index("text-numbers")]
	if !text.Healthy || text.Port != 8080 || text.Weight != 3 || text.SoftLimit != 5 || text.HardLimit != 10 || text.Addr != netip.MustParseAddr("10.0.0.8") {
		t.Errorf("numeric text row = %+v", text)
	}
	if !tbl.Backends[tbl.Index("healthy-two")].Healthy {
		t.Error("healthy=2 read as unhealthy; SQLite truth is non-zero")
	}
}

func TestLoadSkipsInvalidRows(t *testing.T) {
	tests := []struct {
		name   string
		row    string // values for the contract columns
		want   RowError
		schema string
	}{
		{"empty id", `'', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "", "id", "", "must not be empty"}, contractSchema},
		{"null id", `NULL, 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "", "id", "NULL", "must not be empty"}, contractSchema},
		{"wg_ip not an address", `'bad', 'a', 'sa', 'BR', '10.0.0.300', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "10.0.0.300", "must be an IP address"}, contractSchema},
		{"wg_ip null", `'bad', 'a', 'sa', 'BR', NULL, 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "NULL", "must be an IP address"}, contractSchema},
		{"wg_ip with a port", `'bad', 'a', 'sa', 'BR', '10.0.0.1:80', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "10.0.0.1:80", "must be an IP address"}, contractSchema},
		{"port above 65535", `'b3', 'a', 'sa', 'BR', '10.0.0.1', 70000, 1, 1, 10, 20, 0`,
			RowError{"backends", "b3", "port", "70000", "must be 1-65535"}, contractSchema},
		{"port zero", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 0, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "port", "0", "must be 1-65535"}, contractSchema},
		{"port null", `'bad', 'a', 'sa', 'BR', '10.0.0.1', NULL, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "port", "NULL", "must be 1-65535"}, contractSchema},
		{"port not a number", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 'http', 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "port", "http", "must be 1-65535"}, contractSchema},
		{"port fractional", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80.5, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "port", "80.5", "must be 1-65535"}, contractSchema},
		{"negative weight", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, -1, 10, 20, 0`,
			RowError{"backends", "bad", "weight", "-1", "must not be negative"}, contractSchema},
		{"weight not a number", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 'heavy', 10, 20, 0`,
			RowError{"backends", "bad", "weight", "heavy", "must be an integer"}, contractSchema},
		{"negative soft limit", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, -5, 20, 0`,
			RowError{"backends", "bad", "soft_limit", "-5", "must not be negative"}, contractSchema},
		{"negative hard limit", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, -1, 0`,
			RowError{"backends", "bad", "hard_limit", "-1", "must not be negative"}, contractSchema},
		{"soft limit above hard limit", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 30, 20, 0`,
			RowError{"backends", "bad", "soft_limit", "30", "must not exceed hard_limit 20"}, contractSchema},
		{"healthy not a number", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 'yes', 1, 10, 20, 0`,
			RowError{"backends", "bad", "healthy", "yes", "must be an integer"}, contractSchema},
		{"deleted not a number", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 'maybe'`,
			RowError{"backends", "bad", "deleted", "maybe", "must be an integer"}, contractSchema},
		{"deleted a fraction", `'bad', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0.5`,
			RowError{"backends", "bad", "deleted", "0.5", "must be an integer"}, contractSchema},
		{"id not valid UTF-8", `CAST(X'6261FF' AS TEXT), 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "ba\xff", "id", "ba\xff", "must be valid UTF-8"}, contractSchema},
		{"id not valid UTF-8 on a deleted row", `CAST(X'6261FF' AS TEXT), 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 1`,
			RowError{"backends", "ba\xff", "id", "ba\xff", "must be valid UTF-8"}, contractSchema},
		{"id with a NUL byte", `CAST(X'610062' AS TEXT), 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "a\x00b", "id", "a\x00b", "must not contain a NUL byte"}, contractSchema},
		{"id longer than the BPF id field", `'` + strings.Repeat("x", MaxIDLen+1) + `', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", strings.Repeat("x", MaxIDLen+1), "id", strings.Repeat("x", MaxIDLen+1), "is 48 bytes long, at most 47 fit the BPF maps' id field"}, contractSchema},
		{"id of 47 bytes in 24 characters", `'` + strings.Repeat("é", 23) + `x', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{}, contractSchema},
		{"id of 48 bytes in 24 characters", `'` + strings.Repeat("é", 24) + `', 'a', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", strings.Repeat("é", 24), "id", strings.Repeat("é", 24), "is 48 bytes long, at most 47 fit the BPF maps' id field"}, contractSchema},
		{"wg_ip unspecified IPv4", `'bad', 'a', 'sa', 'BR', '0.0.0.0', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "0.0.0.0", "must not be unspecified: 0.0.0.0 means any address, not a backend"}, contractSchema},
		{"wg_ip unspecified IPv6", `'bad', 'a', 'sa', 'BR', '::', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "::", "must not be unspecified: :: means any address, not a backend"}, contractSchema},
		{"wg_ip unspecified IPv4-mapped", `'bad', 'a', 'sa', 'BR', '::ffff:0.0.0.0', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "::ffff:0.0.0.0", "must not be unspecified: 0.0.0.0 means any address, not a backend"}, contractSchema},
		{"wg_ip IPv4 multicast", `'bad', 'a', 'sa', 'BR', '224.0.0.1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "224.0.0.1", "must not be a multicast address: TCP cannot connect to a group"}, contractSchema},
		{"wg_ip IPv6 multicast", `'bad', 'a', 'sa', 'BR', 'ff02::1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "ff02::1", "must not be a multicast address: TCP cannot connect to a group"}, contractSchema},
		{"wg_ip broadcast", `'bad', 'a', 'sa', 'BR', '255.255.255.255', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "255.255.255.255", "must not be the broadcast address"}, contractSchema},
		{"wg_ip link-local without a zone", `'bad', 'a', 'sa', 'BR', 'fe80::1', 80, 1, 1, 10, 20, 0`,
			RowError{"backends", "bad", "wg_ip", "fe80::1", "a link-local address needs a zone naming its interface, e.g. fe80::1%eth0"}, contractSchema},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := newDB(t, tc.schema,
				`INSERT INTO backends VALUES ('good', 'a', 'sa', 'BR', '10.0.0.2', 80, 1, 1, 10, 20, 0)`,
				`INSERT INTO backends VALUES (`+tc.row+`)`)
			tbl, rowErrs := mustLoad(t, path)
			if tc.want == (RowError{}) {
				// A case at the edge of a rule: the row loads.
				if len(rowErrs) != 0 || len(tbl.Backends) != 2 {
					t.Fatalf("loaded %q, row errors %v; want both rows", ids(tbl), rowErrs)
				}
				return
			}
			if !slices.Equal(ids(tbl), []string{"good"}) {
				t.Errorf("loaded %q, want only [good]", ids(tbl))
			}
			if len(rowErrs) != 1 || rowErrs[0] != tc.want {
				t.Fatalf("row errors = %#v, want [%#v]", rowErrs, tc.want)
			}
			msg := rowErrs[0].Error()
			for _, part := range []string{tc.want.Column, strconv.Quote(tc.want.Value), tc.want.Reason} {
				if !strings.Contains(msg, part) {
					t.Errorf("message %q does not name %q", msg, part)
				}
			}
		})
	}
}

func TestRowErrorMessage(t *testing.T) {
	e := RowError{Table: "backends", ID: "b3", Column: "port", Value: "70000", Reason: "must be 1-65535"}
	if got, want := e.Error(), `backends row "b3": column port: value "70000": must be 1-65535`; got != want {
		t.Errorf("Error() = %s, want %s", got, want)
	}
}

func TestLoadReportsEveryBadColumnOfARow(t *testing.T) {
	path := newDB(t, contractSchema,
		`INSERT INTO backends VALUES ('bad', 'a', 'sa', 'BR', 'nowhere', 0, 1, -1, 10, 20, 0)`)
	tbl, rowErrs := mustLoad(t, path)
	var cols []string
	for _, e := range rowErrs {
		cols = append(cols, e.Column)
	}
	if len(tbl.Backends) != 0 || !slices.Equal(cols, []string{"wg_ip", "port", "weight"}) {
		t.Errorf("backends %v, bad columns %v; want none loaded and [wg_ip port weight]", ids(tbl), cols)
	}
}

func TestLoadDeletedRowsAreNotValidated(t *testing.T) {
	path := newDB(t, contractSchema,
		`INSERT INTO backends VALUES ('old', NULL, NULL, NULL, 'gone', NULL, NULL, -1, NULL, NULL, 1)`)
	tbl, rowErrs := mustLoad(t, path)
	if len(rowErrs) != 0 || len(tbl.Backends) != 0 || !slices.Equal(tbl.Deleted, []string{"old"}) {
		t.Errorf("backends %v, deleted %v, row errors %v", ids(tbl), tbl.Deleted, rowErrs)
	}
}

func TestLoadSkipsDuplicateIDs(t *testing.T) {
	// The seed's schema may have been created without a primary key.
	path := newDB(t, strings.Replace(seedSchema, "id TEXT PRIMARY KEY", "id TEXT", 1),
		`INSERT INTO backends VALUES ('twin', 'a', 'sa', '10.0.0.1', 80, 1, 1, 10, 20, 0)`,
		`INSERT INTO backends VALUES ('twin', 'a', 'sa', '10.0.0.2', 80, 1, 1, 10, 20, 0)`,
		`INSERT INTO backends VALUES ('single', 'a', 'sa', '10.0.0.3', 80, 1, 1, 10, 20, 0)`)
	tbl, rowErrs := mustLoad(t, path)
	if !slices.Equal(ids(tbl), []string{"single"}) || len(rowErrs) != 2 || rowErrs[0].ID != "twin" || rowErrs[0].Column != "id" {
		t.Errorf("backends %v, row errors %v; want [single] and two errors for twin", ids(tbl), rowErrs)
	}
}

func TestLoadRegionsOverrideTable(t *testing.T) {
	path := newDB(t, contractSchema, regionsSchema,
		`INSERT INTO backends VALUES ('za-1', 'a', 'af', 'ZA', '10.0.0.1', 80, 1, 1, 10, 20, 0)`,
		`INSERT INTO regions VALUES ('za', 'AF'), ('FR', 'eu-west'), ('XX', '')`)
	tbl, rowErrs := mustLoad(t, path)
	wantErr := RowError{Table: "regions", ID: "XX", Column: "region", Value: "", Reason: "must not be empty"}
	if len(rowErrs) != 1 || rowErrs[0] != wantErr {
		t.Errorf("row errors = %v, want [%v]", rowErrs, wantErr)
	}
	for country, want := range map[string]string{
		"ZA": "af", "fr": "eu-west", // overridden
		"DE": "eu", "BR": "sa", // built-in
		"XX": "us", // the bad override row is skipped
		"":   "",
	} {
		if got := tbl.RegionOf(country); got != want {
			t.Errorf("RegionOf(%q) = %q, want %q", country, got, want)
		}
	}
	// The override routes: a South African client is now "af", like za-1.
	client := Client{Country: "ZA", Region: tbl.RegionOf("ZA")}
	d := Explain(Input{Client: client, LocalRegion: "sa"}, tbl)
	if d.Winner != 0 || d.Candidates[0].Geo != GeoSameCountry {
		t.Errorf("decision %+v", d)
	}
	// And the overrides are part of the content: the version changes.
	plain := newDB(t, contractSchema,
		`INSERT INTO backends VALUES ('za-1', 'a', 'af', 'ZA', '10.0.0.1', 80, 1, 1, 10, 20, 0)`)
	if other, _ := mustLoad(t, plain); other.Version == tbl.Version {
		t.Error("regions override did not change the version")
	}
}

func TestLoadVersionEqualForEqualContent(t *testing.T) {
	rows := []string{
		`INSERT INTO backends VALUES ('a', 'x', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0)`,
		`INSERT INTO backends VALUES ('b', 'x', 'us', 'US', '10.0.0.2', 80, 1, 1, 10, 20, 0)`,
	}
	one, _ := mustLoad(t, newDB(t, contractSchema, rows[0], rows[1]))
	two, _ := mustLoad(t, newDB(t, contractSchema, rows[1], rows[0]))
	if one.Version != two.Version {
		t.Errorf("same rows inserted in another order: versions %x and %x", one.Version, two.Version)
	}
}

func TestLoadFailures(t *testing.T) {
	dir := t.TempDir()
	notSQLite := filepath.Join(dir, "text.db")
	if err := os.WriteFile(notSQLite, []byte("this is not a database, just some text that is long enough\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		path    string
		wantMsg string
	}{
		{"missing file", filepath.Join(dir, "missing.db"), "missing.db"},
		{"not a SQLite file", notSQLite, "text.db"},
		{"no backends table", newDB(t, `CREATE TABLE pops (id TEXT)`), "no backends table"},
		{"backends table missing a column", newDB(t, `CREATE TABLE backends (id TEXT, app TEXT, region TEXT)`), "no column wg_ip"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := os.ReadFile(tc.path)
			tbl, _, err := LoadTable(tc.path)
			if err == nil {
				t.Fatalf("LoadTable succeeded with %d backends", len(tbl.Backends))
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("error %q does not mention %q", err, tc.wantMsg)
			}
			after, _ := os.ReadFile(tc.path)
			if string(before) != string(after) {
				t.Error("LoadTable changed the file")
			}
		})
	}
	if _, _, err := LoadTable(filepath.Join(dir, "missing.db")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: error %v is not fs.ErrNotExist", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "missing.db")); !errors.Is(err, fs.ErrNotExist) {
		t.Error("LoadTable created the missing file")
	}
}

func TestLoadPathNeedingURIEscapes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "odd?name#with%chars.db")
	writeDB(t, path, contractSchema,
		`INSERT INTO backends VALUES ('a', 'x', 'sa', 'BR', '10.0.0.1', 80, 1, 1, 10, 20, 0)`)
	if tbl, _ := mustLoad(t, path); len(tbl.Backends) != 1 {
		t.Errorf("loaded %v", ids(tbl))
	}
}
