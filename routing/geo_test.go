package routing

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// mmdb builds a database of the given type with one record per network.
func mmdb(t testing.TB, dbType string, records map[string]mmdbtype.Map) []byte {
	t.Helper()
	tree, err := mmdbwriter.New(mmdbwriter.Options{
		DatabaseType:            dbType,
		RecordSize:              24,
		IncludeReservedNetworks: true, // some tests map special-purpose ranges on purpose
	})
	if err != nil {
		t.Fatal(err)
	}
	for cidr, rec := range records {
		_, network, err := net.ParseCIDR(cidr)
		if err != nil {
			t.Fatal(err)
		}
		if err := tree.Insert(network, rec); err != nil {
			t.Fatalf("insert %s: %v", cidr, err)
		}
	}
	var buf bytes.Buffer
	if _, err := tree.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func writeFile(t testing.TB, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "geo.mmdb")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// maxmindRecord is shaped like a GeoLite2-Country record.
func maxmindRecord(country, registered string) mmdbtype.Map {
	rec := mmdbtype.Map{
		"continent": mmdbtype.Map{"code": mmdbtype.String("EU")},
		"registered_country": mmdbtype.Map{
			"iso_code": mmdbtype.String(registered),
			"names":    mmdbtype.Map{"en": mmdbtype.String("Registered " + registered)},
		},
	}
	if country != "" {
		rec["country"] = mmdbtype.Map{
			"iso_code":   mmdbtype.String(country),
			"geoname_id": mmdbtype.Uint32(1),
			"names":      mmdbtype.Map{"en": mmdbtype.String("Country " + country)},
		}
	}
	return rec
}

// ipLocationDBRecord is shaped like an ip-location-db *-country record.
func ipLocationDBRecord(country string) mmdbtype.Map {
	return mmdbtype.Map{"country_code": mmdbtype.String(country)}
}

func testRecords(record func(string) mmdbtype.Map) map[string]mmdbtype.Map {
	return map[string]mmdbtype.Map{
		"81.2.69.0/24":   record("FR"),
		"89.160.20.0/24": record("BR"),
		"2a02:cf40::/32": record("JP"),
	}
}

func TestGeoFormats(t *testing.T) {
	tests := []struct {
		name     string
		data     []byte
		wantKind string
	}{
		{"maxmind country", mmdb(t, "GeoLite2-Country", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) })), "maxmind GeoLite2-Country"},
		{"maxmind city", mmdb(t, "GeoIP2-City", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) })), "maxmind GeoIP2-City"},
		{"ip-location-db country", mmdb(t, "country ipvAll", testRecords(ipLocationDBRecord)), "ip-location-db country ipvAll"},
		{"maxmind-shaped records under another type", mmdb(t, "Acme-Country", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) })), "maxmind-compatible Acme-Country"},
	}
	lookups := map[string]string{
		"81.2.69.55":                "FR",
		"::ffff:81.2.69.55":         "FR", // IPv4-mapped IPv6 is looked up as IPv4
		"89.160.20.1":               "BR",
		"2a02:cf40:1234::1":         "JP",
		"175.16.199.9":              "", // not in the database
		"2a02:cf41::1":              "",
		"::ffff:175.16.199.9":       "",
		"fe80::1%eth0":              "",
		"2a02:cf40::1%eth0":         "JP", // the zone does not matter
		"0.0.0.0":                   "",
		"255.255.255.255":           "",
		"2a02:cf40:ffff:ffff::ff":   "JP",
		"::ffff:89.160.20.254":      "BR",
		"89.160.20.255":             "BR",
		"81.2.68.255":               "",
		"2a02:cf3f:ffff:ffff::ffff": "",
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, err := OpenGeo(writeFile(t, tc.data))
			if err != nil {
				t.Fatalf("OpenGeo: %v", err)
			}
			defer g.Close()
			if g.Kind() != tc.wantKind {
				t.Errorf("Kind = %q, want %q", g.Kind(), tc.wantKind)
			}
			for addr, want := range lookups {
				if got := g.Country(netip.MustParseAddr(addr)); got != want {
					t.Errorf("Country(%s) = %q, want %q", addr, got, want)
				}
			}
			if got := g.Country(netip.Addr{}); got != "" {
				t.Errorf("Country(invalid) = %q", got)
			}
		})
	}
}

func TestGeoMaxMindFallsBackToRegisteredCountry(t *testing.T) {
	g, err := OpenGeo(writeFile(t, mmdb(t, "GeoLite2-Country", map[string]mmdbtype.Map{
		"81.2.69.0/24": maxmindRecord("", "US"), // anycast: no country, a registered one
	})))
	if err != nil {
		t.Fatal(err)
	}
	if got := g.Country(netip.MustParseAddr("81.2.69.1")); got != "US" {
		t.Errorf("Country = %q, want the registered country US", got)
	}
}

func TestGeoRejectsDatabasesWithoutCountries(t *testing.T) {
	tests := []struct {
		name    string
		data    []byte
		wantMsg string
	}{
		{"maxmind ASN", mmdb(t, "GeoLite2-ASN", map[string]mmdbtype.Map{
			"81.2.69.0/24": {"autonomous_system_number": mmdbtype.Uint32(64500)},
		}), "no country data"},
		{"unknown records", mmdb(t, "asn ipvAll", map[string]mmdbtype.Map{
			"81.2.69.0/24": {"asn": mmdbtype.Uint32(64500)},
		}), "neither country.iso_code nor country_code"},
		{"not an mmdb", []byte("hello, world"), "invalid MaxMind DB"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := writeFile(t, tc.data)
			_, err := OpenGeo(path)
			if err == nil || !strings.Contains(err.Error(), tc.wantMsg) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %v; want one naming %s and saying %q", err, path, tc.wantMsg)
			}
		})
	}
	if _, err := OpenGeo(filepath.Join(t.TempDir(), "missing.mmdb")); err == nil || !strings.Contains(err.Error(), "missing.mmdb") {
		t.Errorf("missing file: error %v", err)
	}
}

func TestEmbeddedGeo(t *testing.T) {
	g, err := OpenGeo("")
	if err != nil {
		t.Fatalf("OpenGeo embedded: %v", err)
	}
	defer g.Close()
	// The embedded file is ip-location-db's format: records hold country_code.
	if len(g.countryPath) != 1 || g.countryPath[0] != "country_code" {
		t.Errorf("embedded database not read as ip-location-db: %+v", g)
	}
	if md := g.mmdb.Metadata; md.IPVersion != 6 || !strings.HasPrefix(md.DatabaseType, "country") {
		t.Errorf("metadata: ip_version %d, database_type %q; want 6 and country*", md.IPVersion, md.DatabaseType)
	}
	if want := "embedded geo-whois-asn-country " + EmbeddedGeoVersion(); g.Kind() != want || EmbeddedGeoVersion() == "" {
		t.Errorf("Kind = %q, want %q", g.Kind(), want)
	}
	// Lookups only; no traffic. Public resolvers and a private address.
	for addr, want := range map[string]string{
		"8.8.8.8":              "US",
		"::ffff:8.8.8.8":       "US",
		"2001:4860:4860::8888": "US",
		"10.1.2.3":             "",
		"127.0.0.1":            "",
	} {
		if got := g.Country(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Country(%s) = %q, want %q", addr, got, want)
		}
	}
	// A second open shares the decompressed bytes rather than inflating again.
	g2, err := OpenGeo("")
	if err != nil || g2.Country(netip.MustParseAddr("8.8.8.8")) != "US" {
		t.Errorf("second embedded open: %v", err)
	}
}

func TestGeoSourceFollowsTheFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "geo.mmdb")
	addr := netip.MustParseAddr("81.2.69.1")
	install := func(data []byte) {
		tmp := filepath.Join(dir, "next.mmdb")
		if err := os.WriteFile(tmp, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	install(mmdb(t, "GeoLite2-Country", map[string]mmdbtype.Map{"81.2.69.0/24": maxmindRecord("FR", "FR")}))

	src, err := NewGeoSource(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := src.Current().Country(addr); got != "FR" {
		t.Fatalf("Country = %q, want FR", got)
	}
	if changed, err := src.Refresh(); changed || err != nil {
		t.Errorf("Refresh of an unchanged file = (%v, %v)", changed, err)
	}

	steps := []struct {
		name        string
		apply       func()
		wantChanged bool
		wantErr     bool
		wantCountry string
	}{
		{"replaced by rename, other format", func() {
			install(mmdb(t, "country ipvAll", map[string]mmdbtype.Map{"81.2.69.0/24": ipLocationDBRecord("DE")}))
		}, true, false, "DE"},
		{"unchanged", func() {}, false, false, "DE"},
		{"replaced by a broken file", func() { install([]byte("not an mmdb")) }, false, true, "DE"},
		{"broken file reported once", func() {}, false, false, "DE"},
		{"removed", func() { os.Remove(path) }, false, true, "DE"},
		{"overwritten in place", func() {
			data := mmdb(t, "GeoLite2-City", map[string]mmdbtype.Map{"81.2.69.0/24": maxmindRecord("BR", "BR")})
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
		}, true, false, "BR"},
	}
	for _, st := range steps {
		st.apply()
		changed, err := src.Refresh()
		if changed != st.wantChanged || (err != nil) != st.wantErr {
			t.Errorf("%s: Refresh = (%v, %v), want changed %v, error %v", st.name, changed, err, st.wantChanged, st.wantErr)
		}
		if got := src.Current().Country(addr); got != st.wantCountry {
			t.Errorf("%s: Country = %q, want %q", st.name, got, st.wantCountry)
		}
	}
}

func TestGeoSourceEmbeddedNeverChanges(t *testing.T) {
	src, err := NewGeoSource("")
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := src.Refresh(); changed || err != nil {
		t.Errorf("Refresh = (%v, %v)", changed, err)
	}
	if _, err := NewGeoSource(filepath.Join(t.TempDir(), "missing.mmdb")); err == nil {
		t.Error("NewGeoSource succeeded on a missing file")
	}
}

// TestGeoSpecialRangesHaveNoCountry maps every special-purpose range to a
// country in a database of its own, as a database built from registry data
// may, and expects no country for any of them; a public neighbour keeps its.
func TestGeoSpecialRangesHaveNoCountry(t *testing.T) {
	records := map[string]mmdbtype.Map{"81.2.69.0/24": maxmindRecord("FR", "FR")}
	for _, p := range noCountry {
		records[p.String()] = maxmindRecord("AU", "AU")
	}
	g, err := OpenGeo(writeFile(t, mmdb(t, "GeoLite2-Country", records)))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	tests := []struct {
		name, addr, want string
	}{
		{"RFC 1918 ten", "10.1.2.3", ""},
		{"RFC 1918 one-seven-two", "172.31.255.255", ""},
		{"RFC 1918 one-nine-two", "192.168.1.1", ""},
		{"RFC 1918 written IPv4-mapped", "::ffff:192.168.1.1", ""},
		{"carrier-grade NAT", "100.64.0.1", ""},
		{"loopback", "127.0.0.1", ""},
		{"this network", "0.1.2.3", ""},
		{"IPv4 link-local", "169.254.10.1", ""},
		{"IETF protocol assignments", "192.0.0.8", ""},
		{"documentation TEST-NET-1", "192.0.2.1", ""},
		{"benchmarking", "198.19.0.1", ""},
		{"documentation TEST-NET-2", "198.51.100.7", ""},
		{"documentation TEST-NET-3", "203.0.113.9", ""},
		{"IPv4 multicast", "239.1.2.3", ""},
		{"reserved class E", "250.0.0.1", ""},
		{"broadcast", "255.255.255.255", ""},
		{"IPv6 loopback", "::1", ""},
		{"IPv6 unspecified", "::", ""},
		{"IPv6 documentation", "2001:db8::1", ""},
		{"unique local", "fd12:3456::1", ""},
		{"IPv6 link-local with a zone", "fe80::1%eth0", ""},
		{"IPv6 multicast", "ff02::1", ""},
		{"local-use translation prefix", "64:ff9b:1::a", ""},
		{"public neighbour keeps its country", "81.2.69.1", "FR"},
		{"public neighbour IPv4-mapped keeps its country", "::ffff:81.2.69.1", "FR"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := g.Country(netip.MustParseAddr(tc.addr)); got != tc.want {
				t.Errorf("Country(%s) = %q, want %q", tc.addr, got, tc.want)
			}
		})
	}
}

// TestEmbeddedGeoSpecialRangesHaveNoCountry pins the two lookups the
// embedded database gets wrong by itself (it maps 192.168.1.1 to AU and
// 2001:db8::1 to JP), which sent LAN and test clients abroad.
func TestEmbeddedGeoSpecialRangesHaveNoCountry(t *testing.T) {
	g, err := OpenGeo("")
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	tests := []struct {
		name, addr, want string
	}{
		{"private LAN address", "192.168.1.1", ""},
		{"IPv6 documentation address", "2001:db8::1", ""},
		{"public resolver keeps its country", "8.8.8.8", "US"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := g.Country(netip.MustParseAddr(tc.addr)); got != tc.want {
				t.Errorf("Country(%s) = %q, want %q", tc.addr, got, tc.want)
			}
		})
	}
}

func TestGeoDescribeNamesTheFile(t *testing.T) {
	path := writeFile(t, mmdb(t, "GeoLite2-Country", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) })))
	tests := []struct {
		name, path, want string
	}{
		{"a file names its path and kind", path, path + " (maxmind GeoLite2-Country)"},
		{"the embedded one says so", "", "embedded (geo-whois-asn-country " + EmbeddedGeoVersion() + ")"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src, err := NewGeoSource(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if got := src.Describe(); got != tc.want {
				t.Errorf("Describe() = %q, want %q", got, tc.want)
			}
		})
	}
}
