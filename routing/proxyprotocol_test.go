package routing

import (
	"errors"
	"testing"
)

// TestLoadProxyProtocolColumn reads the optional proxy_protocol column:
// 0, NULL and a table without it send no header, 1 and 2 pick the
// version, anything else skips the row naming the column.
func TestLoadProxyProtocolColumn(t *testing.T) {
	path := newDB(t, contractSchema,
		`ALTER TABLE backends ADD COLUMN proxy_protocol INTEGER DEFAULT 0`,
		`INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted, proxy_protocol) VALUES
			('none', 'a', 'sa', 'BR', '10.50.1.1', 8080, 1, 1, 1, 0, 0, 0),
			('null', 'a', 'sa', 'BR', '10.50.1.2', 8080, 1, 1, 1, 0, 0, NULL),
			('v1', 'a', 'sa', 'BR', '10.50.1.3', 8080, 1, 1, 1, 0, 0, 1),
			('v2', 'a', 'sa', 'BR', '10.50.1.4', 8080, 1, 1, 1, 0, 0, 2),
			('v3', 'a', 'sa', 'BR', '10.50.1.5', 8080, 1, 1, 1, 0, 0, 3),
			('text', 'a', 'sa', 'BR', '10.50.1.6', 8080, 1, 1, 1, 0, 0, 'two')`)
	tbl, rowErrs := mustLoad(t, path)
	want := map[string]int{"none": 0, "null": 0, "v1": 1, "v2": 2}
	if len(tbl.Backends) != len(want) {
		t.Fatalf("backends %v, want %v", ids(tbl), want)
	}
	for _, b := range tbl.Backends {
		if b.ProxyProtocol != want[b.ID] {
			t.Errorf("%s: ProxyProtocol %d, want %d", b.ID, b.ProxyProtocol, want[b.ID])
		}
	}
	bad := map[string]bool{}
	for _, e := range rowErrs {
		if e.Column != "proxy_protocol" {
			t.Errorf("row error on column %s: %v", e.Column, e)
		}
		bad[e.ID] = true
	}
	if !bad["v3"] || !bad["text"] || len(bad) != 2 {
		t.Errorf("rows refused for proxy_protocol: %v, want v3 and text", bad)
	}

	old := newDB(t, contractSchema, `INSERT INTO backends VALUES ('old', 'a', 'sa', 'BR', '10.50.1.1', 8080, 1, 1, 1, 0, 0)`)
	tbl, rowErrs = mustLoad(t, old)
	if len(rowErrs) != 0 || len(tbl.Backends) != 1 || tbl.Backends[0].ProxyProtocol != 0 {
		t.Fatalf("table without the column: %+v, %v", tbl.Backends, rowErrs)
	}
}

// TestBackendJSONCarriesProxyProtocol: an etcd row keeps the column both
// ways, and a bad value is refused by the same rule as the file's.
func TestBackendJSONCarriesProxyProtocol(t *testing.T) {
	b, err := ParseBackendJSON("e1", []byte(`{"wg_ip":"10.50.1.1","port":8080,"healthy":1,"proxy_protocol":2}`))
	if err != nil || b.ProxyProtocol != 2 {
		t.Fatalf("parse: %+v, %v", b, err)
	}
	back, err := ParseBackendJSON("e1", MarshalBackend(b))
	if err != nil || back != b {
		t.Fatalf("round trip: %+v, %v; want %+v", back, err, b)
	}
	_, err = ParseBackendJSON("e1", []byte(`{"wg_ip":"10.50.1.1","port":8080,"proxy_protocol":7}`))
	var re RowError
	if !errors.As(err, &re) || re.Column != "proxy_protocol" {
		t.Fatalf("proxy_protocol 7: %v, want a RowError on proxy_protocol", err)
	}
}
