package routing

import (
	"bytes"
	"compress/gzip"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/oschwald/geoip2-golang/v2"
	"github.com/oschwald/maxminddb-golang/v2"
)

// The embedded default: ip-location-db's geo-whois-asn-country (IPv4 and
// IPv6, CC BY 4.0, see NOTICE), refreshed by scripts/geoip-update.sh. It is
// stored compressed to keep the repository and binary small.
var (
	//go:embed geodata/geo-whois-asn-country.mmdb.gz
	embeddedGeoGzip []byte
	//go:embed geodata/VERSION
	embeddedGeoVersion string
)

// EmbeddedGeoVersion is the npm package version of the embedded database.
func EmbeddedGeoVersion() string { return strings.TrimSpace(embeddedGeoVersion) }

// embeddedGeo decompresses the default database once, on first use, so a
// proxy configured with its own file never pays for it. Every Geo opened on
// it shares the bytes, which nothing writes.
var embeddedGeo = sync.OnceValues(func() ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(embeddedGeoGzip))
	if err != nil {
		return nil, fmt.Errorf("decompress embedded geo database: %w", err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		return nil, fmt.Errorf("decompress embedded geo database: %w", err)
	}
	return data, nil
})

// Geo maps client addresses to ISO 3166-1 alpha-2 country codes. Country is
// safe for concurrent use.
type Geo struct {
	kind string
	path string // the file it was read from; "" for the embedded one
	mmdb *maxminddb.Reader
	// countryPath is where a record keeps its country code; fallbackPath,
	// if set, is tried when that is empty.
	countryPath, fallbackPath []any
}

// Record layouts OpenGeo understands, by where the country code sits.
var (
	maxmindCountryPath      = []any{"country", "iso_code"} // GeoIP2/GeoLite2 Country and City
	maxmindRegisteredPath   = []any{"registered_country", "iso_code"}
	ipLocationDBCountryPath = []any{"country_code"} // ip-location-db *-country
)

// OpenGeo opens the .mmdb file at path, or the embedded default when path is
// "". The format comes from the file itself: a database type that geoip2
// knows to carry countries (GeoLite2/GeoIP2 Country, City, Enterprise and
// their DB-IP equivalents) is read at country.iso_code; any other type is
// read at the field its records hold, country.iso_code or ip-location-db's
// country_code. Lookups decode only that field, not geoip2's whole record,
// which is several times slower and allocates the record.
//
// The file is read into memory rather than memory-mapped: copying a new
// database over the old one in place would otherwise pull pages out from
// under live lookups (SIGBUS).
func OpenGeo(path string) (*Geo, error) {
	if path == "" {
		data, err := embeddedGeo()
		if err != nil {
			return nil, err
		}
		g, err := openGeoBytes(data)
		if err != nil {
			return nil, fmt.Errorf("open embedded geo database: %w", err)
		}
		g.kind = "embedded geo-whois-asn-country " + EmbeddedGeoVersion()
		return g, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("open geo database: %w", err)
	}
	g, err := openGeoBytes(data)
	if err != nil {
		return nil, fmt.Errorf("open geo database %s: %w", path, err)
	}
	g.path = path
	return g, nil
}

func openGeoBytes(data []byte) (*Geo, error) {
	r, err := maxminddb.OpenBytes(data)
	if err != nil {
		return nil, err
	}
	g := &Geo{mmdb: r}
	if g.kind, g.countryPath, err = detectFormat(data, r); err != nil {
		r.Close()
		return nil, fmt.Errorf("database type %q: %w", r.Metadata.DatabaseType, err)
	}
	if g.countryPath[0] == maxmindCountryPath[0] {
		g.fallbackPath = maxmindRegisteredPath
	}
	return g, nil
}

// detectFormat asks geoip2, which tracks MaxMind's database type names,
// first; a type it does not know is judged by its records.
func detectFormat(data []byte, r *maxminddb.Reader) (kind string, countryPath []any, err error) {
	mm, err := geoip2.OpenBytes(data)
	if err == nil {
		defer mm.Close()
		// geoip2 also knows types with no country (ASN, ISP, ...).
		if _, err := mm.Country(netip.IPv4Unspecified()); errors.As(err, new(geoip2.InvalidMethodError)) {
			return "", nil, errors.New("no country data")
		}
		return "maxmind " + r.Metadata.DatabaseType, maxmindCountryPath, nil
	}
	if !errors.As(err, new(geoip2.UnknownDatabaseTypeError)) {
		return "", nil, err
	}
	path, format, err := detectRecordPath(r)
	if err != nil {
		return "", nil, err
	}
	return format + " " + r.Metadata.DatabaseType, path, nil
}

// recordsToProbe bounds the search for a record that shows the layout; the
// first few networks of a real database can be reserved or anycast ranges
// without a country.
const recordsToProbe = 64

// detectRecordPath looks for a known country field in the first records.
// The metadata's database_type is free text outside MaxMind's own names
// (ip-location-db writes "country ipvAll"), so the records are the reliable
// witness.
func detectRecordPath(r *maxminddb.Reader) ([]any, string, error) {
	seen := 0
	for res := range r.Networks() {
		var rec map[string]any
		if err := res.Decode(&rec); err != nil {
			return nil, "", fmt.Errorf("decode record for %s: %w", res.Prefix(), err)
		}
		if _, ok := rec["country_code"].(string); ok {
			return ipLocationDBCountryPath, "ip-location-db", nil
		}
		for _, field := range []string{"country", "registered_country"} {
			if c, ok := rec[field].(map[string]any); ok {
				if _, ok := c["iso_code"].(string); ok {
					return maxmindCountryPath, "maxmind-compatible", nil
				}
			}
		}
		if seen++; seen == recordsToProbe {
			break
		}
	}
	if seen == 0 {
		return nil, "", errors.New("no records")
	}
	return nil, "", errors.New("records have neither country.iso_code nor country_code")
}

// Country returns the client's ISO country code (upper-case), or "" when the
// database does not know the address. IPv4-mapped IPv6 is looked up as IPv4.
// For MaxMind data, an address with no country record (anycast, satellite)
// falls back to its registered country, which is still a better hint than
// none.
//
// Addresses that belong to no country (private, shared, loopback,
// link-local, multicast, documentation and other special-purpose ranges,
// see noCountry) have none whatever the database says: some databases map
// them to whoever registered the block, which would send a client on the
// LAN abroad.
func (g *Geo) Country(addr netip.Addr) string {
	if !addr.IsValid() {
		return ""
	}
	addr = addr.WithZone("").Unmap()
	if HasNoCountry(addr) {
		return ""
	}
	res := g.mmdb.Lookup(addr)
	if !res.Found() {
		return ""
	}
	var cc string
	if err := res.DecodePath(&cc, g.countryPath...); err != nil {
		return ""
	}
	if cc == "" && g.fallbackPath != nil {
		if err := res.DecodePath(&cc, g.fallbackPath...); err != nil {
			return ""
		}
	}
	return strings.ToUpper(cc)
}

// noCountry are the special-purpose ranges (RFC 6890 and its IANA
// registries) whose addresses are not in any country: a client from one
// of them is on a private network, behind carrier NAT, or not a real
// client at all.
var noCountry = func() []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range []string{
		"0.0.0.0/8",       // "this network"
		"10.0.0.0/8",      // RFC 1918
		"100.64.0.0/10",   // shared address space (carrier-grade NAT)
		"127.0.0.0/8",     // loopback
		"169.254.0.0/16",  // link-local
		"172.16.0.0/12",   // RFC 1918
		"192.0.0.0/24",    // IETF protocol assignments
		"192.0.2.0/24",    // TEST-NET-1 (documentation)
		"192.168.0.0/16",  // RFC 1918
		"198.18.0.0/15",   // benchmarking
		"198.51.100.0/24", // TEST-NET-2 (documentation)
		"203.0.113.0/24",  // TEST-NET-3 (documentation)
		"224.0.0.0/4",     // multicast
		"240.0.0.0/4",     // reserved, 255.255.255.255 (broadcast) included
		"::/128",          // unspecified
		"::1/128",         // loopback
		"64:ff9b:1::/48",  // local-use IPv4/IPv6 translation
		"2001:db8::/32",   // documentation
		"fc00::/7",        // unique local (ULA)
		"fe80::/10",       // link-local
		"ff00::/8",        // multicast
	} {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}()

// HasNoCountry reports whether addr lies in a special-purpose range that
// belongs to no country (see Geo.Country). IPv4-mapped IPv6 is judged as
// IPv4.
func HasNoCountry(addr netip.Addr) bool {
	addr = addr.WithZone("").Unmap()
	for _, p := range noCountry {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// Kind names the database for logs, e.g. "embedded geo-whois-asn-country
// 2.3.2026061719", "maxmind GeoLite2-Country", "ip-location-db country
// ipvAll".
func (g *Geo) Kind() string { return g.kind }

// Describe names the database for the start line: its file and its kind,
// e.g. "/var/lib/geo/GeoLite2-Country.mmdb (maxmind GeoLite2-Country)",
// or "embedded (geo-whois-asn-country 2.3.2026061719)".
func (g *Geo) Describe() string {
	if g.path == "" {
		return "embedded (" + strings.TrimPrefix(g.kind, "embedded ") + ")"
	}
	return g.path + " (" + g.kind + ")"
}

// Close releases the database. It must not run concurrently with Country;
// GeoSource therefore never closes a Geo it has handed out.
func (g *Geo) Close() error { return g.mmdb.Close() }

// GeoSource is a Geo that follows its file: Refresh reopens it when it
// changed on disk, so replacing the database takes effect without a restart.
type GeoSource struct {
	path string
	cur  atomic.Pointer[Geo]

	refreshing sync.Mutex
	// seen is the file state of the last open attempt, good or bad, so an
	// unchanged file is neither reopened nor re-reported.
	seen fileState
}

type fileState struct {
	info os.FileInfo
	err  error // from stat
}

func (a fileState) equal(b fileState) bool {
	if (a.err == nil) != (b.err == nil) || (a.err != nil && a.err.Error() != b.err.Error()) {
		return false
	}
	if (a.info == nil) != (b.info == nil) {
		return false
	}
	return a.info == nil || sameContent(a.info, b.info)
}

func statFile(path string) fileState {
	fi, err := os.Stat(path)
	return fileState{info: fi, err: err}
}

// NewGeoSource opens path ("" for the embedded database); the first open
// must succeed.
func NewGeoSource(path string) (*GeoSource, error) {
	s := &GeoSource{path: path}
	if path != "" {
		s.seen = statFile(path)
	}
	g, err := OpenGeo(path)
	if err != nil {
		return nil, err
	}
	s.cur.Store(g)
	return s, nil
}

// Current is the database to look up with.
func (s *GeoSource) Current() *Geo { return s.cur.Load() }

// Describe names the database in use, its file and kind (Geo.Describe),
// for the start line and reload logs.
func (s *GeoSource) Describe() string { return s.Current().Describe() }

// Refresh reopens the file if its identity, size or mtime changed since the
// last attempt; the proxy calls it periodically and on SIGHUP. A file that
// fails to open (missing, half-written, not an mmdb) leaves the current
// database in place and is reported once, until the file changes again.
// The embedded database never changes.
func (s *GeoSource) Refresh() (changed bool, err error) {
	if s.path == "" {
		return false, nil
	}
	s.refreshing.Lock()
	defer s.refreshing.Unlock()

	st := statFile(s.path)
	if st.equal(s.seen) {
		return false, nil
	}
	s.seen = st
	if st.err != nil {
		return false, fmt.Errorf("refresh geo database: %w", st.err)
	}
	g, err := OpenGeo(s.path)
	if err != nil {
		return false, fmt.Errorf("refresh: %w", err)
	}
	// The old Geo is heap-backed and may still be in use: let the GC have it.
	s.cur.Store(g)
	return true, nil
}
