package wgmesh

import (
	"database/sql"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/edgeproxy/edgeproxy/routing"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

const popsSchema = `CREATE TABLE pops (
    id TEXT PRIMARY KEY, region TEXT, wg_public_key TEXT NOT NULL,
    endpoint TEXT, wg_ip TEXT NOT NULL, allowed_ips TEXT NOT NULL,
    deleted INTEGER DEFAULT 0)`

// testKey is a deterministic public key, distinct per n.
func testKey(n byte) wgtypes.Key {
	var k wgtypes.Key
	for i := range k {
		k[i] = n
	}
	return k
}

func writePops(t *testing.T, schema string, rows ...[]any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "routing.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if schema != "" {
		if _, err := db.Exec(schema); err != nil {
			t.Fatalf("create pops: %v", err)
		}
	} else if _, err := db.Exec(`CREATE TABLE backends (id TEXT)`); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		marks := strings.TrimSuffix(strings.Repeat("?, ", len(r)), ", ")
		if _, err := db.Exec("INSERT INTO pops VALUES ("+marks+")", r...); err != nil {
			t.Fatalf("insert %v: %v", r, err)
		}
	}
	return path
}

func TestLoadPopsValidRows(t *testing.T) {
	path := writePops(t, popsSchema,
		[]any{"pop-b", "eu", testKey(2).String(), "192.0.2.2:51820", "10.50.2.1", "10.50.2.1/32, 10.60.2.0/24", 0},
		[]any{"pop-a", "sa", testKey(1).String(), "", "10.50.1.1", "10.50.1.1/32", nil},
		[]any{"pop-c", "us", testKey(3).String(), "edge-c.example.net:51820", "fd00::3", "fd00::3/128", 0},
	)
	pops, rowErrs, err := LoadPops(path)
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("LoadPops: err %v, row errors %v", err, rowErrs)
	}
	if got := ids(pops); !slices.Equal(got, []string{"pop-a", "pop-b", "pop-c"}) {
		t.Fatalf("pops = %v, want sorted by id", got)
	}
	b := pops[1]
	want := Pop{ID: "pop-b", Region: "eu", PublicKey: testKey(2), Endpoint: "192.0.2.2:51820",
		WGIP: netip.MustParseAddr("10.50.2.1"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.50.2.1/32"), netip.MustParsePrefix("10.60.2.0/24")}}
	if b.ID != want.ID || b.Region != want.Region || b.PublicKey != want.PublicKey || b.Endpoint != want.Endpoint || b.WGIP != want.WGIP || !slices.Equal(b.AllowedIPs, want.AllowedIPs) {
		t.Fatalf("pop-b = %+v, want %+v", b, want)
	}
	if pops[0].Endpoint != "" {
		t.Errorf("pop-a endpoint = %q, want empty (it dials in)", pops[0].Endpoint)
	}
}

func ids(pops []Pop) []string {
	var out []string
	for _, p := range pops {
		out = append(out, p.ID)
	}
	return out
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
	cases := []struct {
		name   string
		row    []any
		column string
		reason string
	}{
		{"key not base64", with(good("k1", 1, "10.50.0.1"), 2, "not-a-key!"), "wg_public_key", "not base64"},
		{"key of 31 bytes", with(good("k2", 2, "10.50.0.2"), 2, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="), "wg_public_key", "decodes to 31 bytes"},
		{"key empty", with(good("k3", 3, "10.50.0.3"), 2, ""), "wg_public_key", "required"},
		{"wg_ip not an address", with(good("ip1", 4, "10.50.0.4"), 4, "10.50.0"), "wg_ip", "not an IP address"},
		{"cidr not parsing", with(good("c1", 5, "10.50.0.5"), 5, "10.50.0.5/32,10.60.0.0/33"), "allowed_ips", `"10.60.0.0/33" is not a CIDR prefix`},
		{"cidr with host bits", with(good("c2", 6, "10.50.0.6"), 5, "10.50.0.6/32,10.60.6.1/24"), "allowed_ips", "host bits set: write 10.60.6.0/24 or 10.60.6.1/32"},
		{"no cidr", with(good("c3", 7, "10.50.0.7"), 5, " , "), "allowed_ips", "no prefix"},
		{"wg_ip outside allowed_ips", with(good("c4", 8, "10.50.0.8"), 5, "10.60.8.0/24"), "allowed_ips", "does not contain wg_ip 10.50.0.8: add 10.50.0.8/32"},
		{"endpoint without port", with(good("e1", 9, "10.50.0.9"), 3, "192.0.2.9"), "endpoint", "not host:port"},
		{"endpoint port out of range", with(good("e2", 10, "10.50.0.10"), 3, "192.0.2.10:70000"), "endpoint", `port "70000" is not 1-65535`},
		{"endpoint empty host", with(good("e3", 11, "10.50.0.11"), 3, ":51820"), "endpoint", "empty host"},
		{"deleted not a number", with(good("d1", 12, "10.50.0.12"), 6, "yes"), "deleted", "not a number"},
	}
	var rows [][]any
	for _, c := range cases {
		rows = append(rows, c.row)
	}
	rows = append(rows, good("ok", 99, "10.50.0.99"))
	pops, rowErrs, err := LoadPops(writePops(t, popsSchema, rows...))
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(pops); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("loaded %v, want only the good row", got)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := c.row[0].(string)
			for _, e := range rowErrs {
				var re routing.RowError
				if errors.As(e, &re) && re.ID == id {
					if re.Table != "pops" || re.Column != c.column || !strings.Contains(re.Reason, c.reason) {
						t.Fatalf("error %q: want table pops, column %s, reason containing %q", e, c.column, c.reason)
					}
					if !strings.Contains(e.Error(), `pops row "`+id+`"`) {
						t.Fatalf("error %q does not name the row", e)
					}
					return
				}
			}
			t.Fatalf("no row error for %s in %v", id, rowErrs)
		})
	}
}

func TestLoadPopsDeletedRowsAreLeftOutSilently(t *testing.T) {
	path := writePops(t, popsSchema,
		[]any{"gone", "sa", "garbage", "", "nonsense", "", 1},
		[]any{"kept", "sa", testKey(1).String(), "", "10.50.0.1", "10.50.0.1/32", "0"},
	)
	pops, rowErrs, err := LoadPops(path)
	if err != nil || len(rowErrs) > 0 {
		t.Fatalf("err %v, row errors %v: a deleted row is not validated", err, rowErrs)
	}
	if got := ids(pops); !slices.Equal(got, []string{"kept"}) {
		t.Fatalf("pops = %v, want [kept]", got)
	}
}

func TestLoadPopsConflicts(t *testing.T) {
	path := writePops(t, popsSchema,
		[]any{"a", "sa", testKey(1).String(), "", "10.50.0.1", "10.50.0.1/32,10.60.0.0/16", 0},
		[]any{"b", "sa", testKey(1).String(), "", "10.50.0.2", "10.50.0.2/32", 0},
		[]any{"c", "sa", testKey(3).String(), "", "10.50.0.3", "10.50.0.3/32,10.60.5.0/24", 0},
		[]any{"d", "sa", testKey(4).String(), "", "10.50.0.4", "10.50.0.4/32", 0},
	)
	pops, rowErrs, err := LoadPops(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(pops); !slices.Equal(got, []string{"a", "d"}) {
		t.Errorf("pops = %v, want [a d]", got)
	}
	want := []string{
		`pops row "b": column wg_public_key`, `same key as row "a"`,
		`pops row "c": column allowed_ips`, `10.60.5.0/24 overlaps 10.60.0.0/16 of row "a"`,
	}
	all := errors.Join(rowErrs...).Error()
	for _, w := range want {
		if !strings.Contains(all, w) {
			t.Errorf("row errors %q lack %q", all, w)
		}
	}
}

func TestLoadPopsWithoutTableIsEmpty(t *testing.T) {
	pops, rowErrs, err := LoadPops(writePops(t, ""))
	if err != nil || len(pops) != 0 || len(rowErrs) != 0 {
		t.Fatalf("no pops table: got %v, %v, %v; want nothing and no error", pops, rowErrs, err)
	}
}

func TestLoadPopsMinimalColumns(t *testing.T) {
	path := writePops(t, `CREATE TABLE pops (id TEXT, wg_public_key TEXT, wg_ip TEXT, allowed_ips TEXT)`,
		[]any{"a", testKey(1).String(), "10.50.0.1", "10.50.0.1/32"})
	pops, rowErrs, err := LoadPops(path)
	if err != nil || len(rowErrs) > 0 || len(pops) != 1 {
		t.Fatalf("got %v, %v, %v; want one pop", pops, rowErrs, err)
	}
}

func TestLoadPopsDatabaseErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.db")
	if _, _, err := LoadPops(missing); err == nil || !strings.Contains(err.Error(), "nope.db") {
		t.Errorf("missing file: err %v, want one naming the path", err)
	}
	noCol := writePops(t, `CREATE TABLE pops (id TEXT, wg_public_key TEXT, wg_ip TEXT)`)
	if _, _, err := LoadPops(noCol); err == nil || !strings.Contains(err.Error(), "no column allowed_ips") {
		t.Errorf("missing column: err %v, want it named", err)
	}
}

func TestParsePopRow(t *testing.T) {
	p, err := ParsePopRow("x", "sa", testKey(7).String(), "[2001:db8::1]:51820", "10.50.0.7", "10.50.0.7/32")
	if err != nil || p.Endpoint != "[2001:db8::1]:51820" {
		t.Fatalf("got %+v, %v", p, err)
	}
}
