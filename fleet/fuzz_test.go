package fleet

import (
	"errors"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/edgeproxy/edgeproxy/routing"
)

const fuzzPrefix = "/edgeproxy/"

// FuzzDecode feeds any key and value under the prefix to the decoder the
// follower and `ctl put` share. It must not panic; a refused value gives
// a reason (a RowError naming the column for a row of a known table); an
// accepted row round-trips: marshalled as `ctl export` writes it, it
// decodes to the same row, and written into routing.db as the follower
// writes it, it reads back the same.
func FuzzDecode(f *testing.F) {
	seeds := []struct{ key, value string }{
		{"backends/a", `{"app":"web","region":"sa","country":"BR","wg_ip":"10.0.0.1","port":8080,"healthy":1,"weight":2,"soft_limit":10,"hard_limit":20}`},
		{"backends/b", `{"id":"b","wg_ip":"fd00::1","port":1}`},
		{"backends/c", `{"id":"not-c","wg_ip":"10.0.0.1","port":80}`},
		{"backends/d", `{"wg_ip":"::ffff:10.0.0.1","port":80,"healthy":2}`},
		{"backends/e", `{"wg_ip":"10.0.0.1","port":70000}`},
		{"backends/f", `{"wg_ip":"10.0.0.1","port":80,"weight":1e400}`},
		{"backends/g", `{"wg_ip":"10.0.0.1","port":80,"deleted":1}`},
		{"backends/h", `{"wg_ip":"10.0.0.1","port":80} {}`},
		{"backends/", `{"wg_ip":"10.0.0.1","port":80}`},
		{"backends/i", `null`},
		{"backends/j", `{"wg_ip":"10.0.0.1","port":"80","weight":-3,"soft_limit":9223372036854775808}`},
		{"pops/p1", `{"region":"sa","wg_public_key":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=","endpoint":"192.0.2.1:51820","wg_ip":"10.50.1.1","allowed_ips":"10.50.1.0/24"}`},
		{"pops/p2", `{"wg_public_key":"short","wg_ip":"10.50.2.1","allowed_ips":"10.50.3.0/24"}`},
		{"pops/p3", `{"wg_public_key":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=","wg_ip":"fd00::1","allowed_ips":"fd00::/64, 10.0.0.0/8","endpoint":""}`},
		{"regions/br", `{"region":"EU"}`},
		{"regions/ BR ", `{"country":"br","region":"sa"}`},
		{"regions/XX", `{"country":"YY","region":"us"}`},
		{"regions/", `{"region":"us"}`},
		{"other/a", `{}`},
		{"backends", `{}`},
	}
	for _, s := range seeds {
		f.Add(s.key, []byte(s.value))
	}
	f.Fuzz(func(t *testing.T, rest string, value []byte) {
		key := fuzzPrefix + rest
		c, err := decode(fuzzPrefix, key, value)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("%s=%q: refused with an empty reason", key, value)
			}
			// A value of a known table is refused column by column
			// (the follower counts and logs each).
			var rowErr routing.RowError
			if c.Table != "" && !errors.As(err, &rowErr) {
				t.Fatalf("%s=%q: refusal %q carries no RowError", key, value, err)
			}
			return
		}
		table, id, perr := parseKey(fuzzPrefix, key)
		if perr != nil || table != c.Table {
			t.Fatalf("%s: decoded as table %q but the key parses as %q (%v)", key, c.Table, table, perr)
		}
		var again routing.Change
		var rerr error
		switch c.Table {
		case routing.TableBackends:
			if c.Backend == nil || c.Backend.ID != id {
				t.Fatalf("%s=%q: backend %+v, want id %q", key, value, c.Backend, id)
			}
			again, rerr = decode(fuzzPrefix, Key(fuzzPrefix, c.Table, c.ID), routing.MarshalBackend(*c.Backend))
		case routing.TablePops:
			if c.Pop == nil || c.Pop.ID != id {
				t.Fatalf("%s=%q: pop %+v, want id %q", key, value, c.Pop, id)
			}
			again, rerr = decode(fuzzPrefix, Key(fuzzPrefix, c.Table, c.ID), routing.MarshalPop(*c.Pop))
		case routing.TableRegions:
			if c.Region == "" || c.ID != strings.ToUpper(c.ID) || c.Region != strings.ToLower(c.Region) {
				t.Fatalf("%s=%q: region row %q -> %q, want an upper-case country and a lower-case region", key, value, c.ID, c.Region)
			}
			again, rerr = decode(fuzzPrefix, Key(fuzzPrefix, c.Table, c.ID), routing.MarshalRegion(c.ID, c.Region))
		default:
			t.Fatalf("%s: accepted under unknown table %q", key, c.Table)
		}
		if rerr != nil {
			t.Fatalf("%s=%q: its own marshalled form is refused: %v", key, value, rerr)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("%s=%q: round trip changed the row:\n first %+v\n again %+v", key, value, c, again)
		}

		// The follower writes the row into routing.db; read back, it
		// is the same row.
		db := filepath.Join(t.TempDir(), "routing.db")
		if err := routing.ApplyChanges(db, []routing.Change{c}); err != nil {
			t.Fatalf("%s=%q: write into routing.db: %v", key, value, err)
		}
		rows, rowErrs, err := routing.ReadRows(db)
		if err != nil || len(rowErrs) > 0 {
			t.Fatalf("%s=%q: read back from routing.db: %v %v", key, value, err, rowErrs)
		}
		switch c.Table {
		case routing.TableBackends:
			if len(rows.Backends) != 1 || !reflect.DeepEqual(rows.Backends[0], *c.Backend) {
				t.Fatalf("%s=%q: routing.db holds %+v, want %+v", key, value, rows.Backends, *c.Backend)
			}
		case routing.TablePops:
			if len(rows.Pops) != 1 || !reflect.DeepEqual(rows.Pops[0], *c.Pop) {
				t.Fatalf("%s=%q: routing.db holds %+v, want %+v", key, value, rows.Pops, *c.Pop)
			}
		case routing.TableRegions:
			if len(rows.Regions) != 1 || rows.Regions[c.ID] != c.Region {
				t.Fatalf("%s=%q: routing.db holds %v, want %s -> %s", key, value, rows.Regions, c.ID, c.Region)
			}
		}
	})
}

// TestDecodeAcceptsTheValidSeeds keeps FuzzDecode's round trip exercised
// by its seeds: these values are valid rows of each table.
func TestDecodeAcceptsTheValidSeeds(t *testing.T) {
	for _, kv := range []struct{ key, value string }{
		{"backends/a", `{"app":"web","region":"sa","country":"BR","wg_ip":"10.0.0.1","port":8080,"healthy":1,"weight":2,"soft_limit":10,"hard_limit":20}`},
		{"pops/p1", `{"region":"sa","wg_public_key":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=","endpoint":"192.0.2.1:51820","wg_ip":"10.50.1.1","allowed_ips":"10.50.1.0/24"}`},
		{"regions/br", `{"region":"EU"}`},
	} {
		if _, err := decode(fuzzPrefix, fuzzPrefix+kv.key, []byte(kv.value)); err != nil {
			t.Errorf("%s: %v", kv.key, err)
		}
	}
}
