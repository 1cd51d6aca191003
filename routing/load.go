package routing

import (
	"context"
	"database/sql"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// RowError names one value of one row that failed validation. The row is
// skipped; the rest of the table loads.
type RowError struct{ Table, ID, Column, Value, Reason string }

func (e RowError) Error() string {
	return fmt.Sprintf("%s row %q: column %s: value %q: %s", e.Table, e.ID, e.Column, e.Value, e.Reason)
}

// MaxIDLen is the longest row id, in bytes. The BPF maps keep ids in a
// 48-byte NUL-terminated field, so a longer id would be cut there and the
// two data planes would disagree about which backend a client is bound to.
const MaxIDLen = 47

// LoadOptions carry what routing cannot know by itself: it has no sockets,
// so facts about the host come from the caller. The zero value checks
// nothing host-specific.
type LoadOptions struct {
	// IsSelf reports whether a backend address is this proxy's own listen
	// address; such a row would make the proxy dial itself until its
	// descriptors run out, so it is skipped. Nil: no row is.
	IsSelf func(netip.AddrPort) bool
	// HostAddrs lists this host's own addresses. A pops row whose
	// allowed_ips covers one is skipped: the overlay would route this
	// host's own traffic into the tunnel. Nil: no such check. It is called
	// once per load.
	HostAddrs func() []netip.Addr
	// PopID is this POP's id in the pops table. Its own row is not a peer
	// and its allowed_ips hold this host's overlay address by design, so
	// HostAddrs does not apply to it.
	PopID string
}

// loadTimeout bounds one read of routing.db, busy waits included, so a
// wedged writer cannot stall a reload forever.
const loadTimeout = 10 * time.Second

// LoadTable reads routing.db read-only and validates every row.
//
// It accepts the contract's 11-column backends table and the seed's older
// 10-column one without `country`, telling them apart with PRAGMA
// table_info; an optional regions(country, region) table overrides the
// built-in country -> region map. Both are read in one transaction, so they
// come from the same committed state.
//
// Bad rows are skipped and returned as RowErrors. NULLs read as the safe or
// neutral value: healthy NULL is unhealthy (traffic goes only where someone
// said it may), deleted NULL is not deleted (the seed's rule), weight,
// soft_limit and hard_limit NULL are 0 (meaning 1, 1 and no limit), and app,
// region and country NULL are "". id, wg_ip and port have no neutral value,
// so NULL there is a RowError. Integer columns also accept integral reals and
// numeric text; healthy and deleted follow SQLite's truth rule (non-zero is
// true).
//
// A missing file, a file that is not SQLite, or a database with no backends
// table is an error. The file is never created or written.
func LoadTable(path string) (*Table, []RowError, error) {
	return LoadTableWith(path, LoadOptions{})
}

// LoadTableWith is LoadTable with the host-specific checks of opts. The
// pops table, when present, is read in the same transaction into
// Table.Pops (see LoadPops for its rules); its absence is not an error.
func LoadTableWith(path string, opts LoadOptions) (*Table, []RowError, error) {
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	db, err := OpenReadOnly(path)
	if err != nil {
		return nil, nil, err
	}
	defer db.Close()
	return loadTable(ctx, db, path, opts)
}

// sqliteDriver is modernc.org/sqlite's database/sql driver name.
const sqliteDriver = "sqlite"

// OpenReadOnly opens routing.db through a "file:" URI with mode=ro: only the
// URI form makes SQLite honor mode=ro, and without it a missing file would
// be created empty. A busy timeout lets a read wait out a writer's commit.
// Other readers of routing.db (the WireGuard pops table) use it too.
func OpenReadOnly(path string) (*sql.DB, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open routing db: %w", err)
	}
	if fi.IsDir() {
		return nil, fmt.Errorf("open routing db %s: is a directory", path)
	}
	db, err := sql.Open(sqliteDriver, readOnlyURI(path))
	if err != nil {
		return nil, fmt.Errorf("open routing db %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// uriPathEscaper escapes what SQLite's URI parser would otherwise read as a
// query, a fragment or an escape inside the path.
var uriPathEscaper = strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23")

func readOnlyURI(path string) string {
	// Clean turns a leading "//" into "/", which SQLite would otherwise take
	// for the start of a URI authority.
	return "file:" + uriPathEscaper.Replace(filepath.Clean(path)) + "?mode=ro&_pragma=busy_timeout(2000)"
}

// backendColumns is the contract's column order; optionalBackendColumns
// are those an older table may lack: country (the seed's ten-column table)
// and proxy_protocol (added by the second wave of issues).
var backendColumns = []string{
	"id", "app", "region", "country", "wg_ip", "port",
	"healthy", "weight", "soft_limit", "hard_limit", "deleted", "proxy_protocol",
}

var optionalBackendColumns = map[string]bool{"country": true, "proxy_protocol": true}

func loadTable(ctx context.Context, db *sql.DB, path string, opts LoadOptions) (*Table, []RowError, error) {
	rows, err := readRows(ctx, db, path, opts)
	if err != nil {
		return nil, nil, err
	}
	t, err := newTable(rows.backends, rows.deleted, rows.regions, rows.pops)
	if err != nil {
		// dropDuplicates and parseBackend leave nothing NewTable refuses.
		return nil, nil, fmt.Errorf("read routing db %s: %w", path, err)
	}
	return t, rows.errs, nil
}

// tableRows is what one read of routing.db found, row by row validated:
// the valid rows of each table, the ids of deleted backends, and every
// row skipped.
type tableRows struct {
	backends []Backend
	deleted  []string
	regions  map[string]string // the regions table alone, not the built-in map
	pops     []Pop
	errs     []RowError
}

// readRows reads the three tables of routing.db in one read transaction,
// so they come from the same committed state.
func readRows(ctx context.Context, db *sql.DB, path string, opts LoadOptions) (tableRows, error) {
	var out tableRows
	// Asked before the transaction opens, so a slow answer holds no
	// read lock on routing.db.
	var hostAddrs []netip.Addr
	if opts.HostAddrs != nil {
		hostAddrs = opts.HostAddrs()
	}
	tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return out, fmt.Errorf("read routing db %s: %w", path, err)
	}
	defer tx.Rollback() // read-only: ending it is all Rollback does

	cols, err := TableColumns(ctx, tx, "backends")
	if err != nil {
		return out, fmt.Errorf("read routing db %s: %w", path, err)
	}
	if len(cols) == 0 {
		return out, fmt.Errorf("read routing db %s: no backends table", path)
	}
	selects := make([]string, len(backendColumns))
	for i, c := range backendColumns {
		declared, ok := cols[c]
		switch {
		case ok:
			selects[i] = quoteIdent(declared)
		case optionalBackendColumns[c]:
			selects[i] = "NULL"
		default:
			return out, fmt.Errorf("read routing db %s: backends table has no column %s", path, c)
		}
	}

	rows, err := tx.QueryContext(ctx, "SELECT "+strings.Join(selects, ", ")+" FROM backends")
	if err != nil {
		return out, fmt.Errorf("read routing db %s: backends: %w", path, err)
	}
	vals := make([]any, len(backendColumns))
	ptrs := make([]any, len(vals))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	for rows.Next() {
		if err := rows.Scan(ptrs...); err != nil {
			rows.Close()
			return out, fmt.Errorf("read routing db %s: backends: %w", path, err)
		}
		b, isDeleted, errs := parseBackend(vals, opts.IsSelf)
		switch {
		case len(errs) > 0:
			out.errs = append(out.errs, errs...)
		case isDeleted:
			out.deleted = append(out.deleted, b.ID)
		default:
			out.backends = append(out.backends, b)
		}
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("read routing db %s: backends: %w", path, err)
	}
	rows.Close()
	var dupErrs []RowError
	out.backends, dupErrs = dropDuplicates(out.backends)
	out.errs = append(out.errs, dupErrs...)

	overrides, regionErrs, err := loadRegions(ctx, tx)
	if err != nil {
		return out, fmt.Errorf("read routing db %s: regions: %w", path, err)
	}
	out.regions = overrides
	out.errs = append(out.errs, regionErrs...)

	pops, popErrs, err := readPops(ctx, tx, opts.PopID, hostAddrs)
	if err != nil {
		return out, fmt.Errorf("read routing db %s: %w", path, err)
	}
	out.pops = pops
	out.errs = append(out.errs, popErrs...)
	return out, nil
}

// TableColumns maps each lower-cased column name of table to its declared
// spelling; an absent table has no columns. A file that is not SQLite fails
// here, on the first read.
func TableColumns(ctx context.Context, tx *sql.Tx, table string) (map[string]string, error) {
	rows, err := tx.QueryContext(ctx, "SELECT name FROM pragma_table_info(?)", table)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	cols := make(map[string]string)
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, err
		}
		cols[strings.ToLower(name)] = name
	}
	return cols, rows.Err()
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// parseBackend validates one row in backendColumns order. Every bad column
// is reported, not just the first, so one pass over the errors fixes the row.
// A deleted row is only checked for its id: it routes nothing, so its other
// columns may be stale.
func parseBackend(vals []any, isSelf func(netip.AddrPort) bool) (b Backend, isDeleted bool, errs []RowError) {
	b.ID = text(vals[0])
	bad := func(col string, v any, reason string) {
		errs = append(errs, RowError{Table: "backends", ID: b.ID, Column: col, Value: valueText(v), Reason: reason})
	}
	if reason := checkID(b.ID); reason != "" {
		bad("id", vals[0], reason)
		return b, false, errs
	}
	del, ok := truth(vals[10])
	if !ok {
		bad("deleted", vals[10], "must be an integer")
		return b, false, errs
	}
	if del {
		return b, true, nil
	}

	b.App = text(vals[1])
	b.Region = text(vals[2])
	b.Country = text(vals[3])

	addr, err := netip.ParseAddr(strings.TrimSpace(text(vals[4])))
	switch {
	case err != nil:
		bad("wg_ip", vals[4], "must be an IP address")
	default:
		b.Addr = addr.Unmap()
		if reason := checkBackendAddr(b.Addr); reason != "" {
			bad("wg_ip", vals[4], reason)
		}
	}
	portOK := false
	if port, ok := integer(vals[5]); !ok || port < 1 || port > math.MaxUint16 {
		bad("port", vals[5], "must be 1-65535")
	} else {
		b.Port, portOK = uint16(port), true
	}
	if isSelf != nil && len(errs) == 0 && portOK && isSelf(b.AddrPort()) {
		bad("wg_ip", vals[4], fmt.Sprintf("%s is this proxy's own listen address", b.AddrPort()))
	}
	if vals[6] != nil {
		if b.Healthy, ok = truth(vals[6]); !ok {
			bad("healthy", vals[6], "must be an integer")
		}
	}
	limit := func(col string, v any) int {
		if v == nil {
			return 0
		}
		n, ok := integer(v)
		switch {
		case !ok:
			bad(col, v, "must be an integer")
		case n < 0:
			bad(col, v, "must not be negative")
		}
		return int(n)
	}
	b.Weight = limit("weight", vals[7])
	b.SoftLimit = limit("soft_limit", vals[8])
	b.HardLimit = limit("hard_limit", vals[9])
	if b.SoftLimit > 0 && b.HardLimit > 0 && b.SoftLimit > b.HardLimit {
		bad("soft_limit", vals[8], fmt.Sprintf("must not exceed hard_limit %d", b.HardLimit))
	}
	// NULL (or a table without the column) sends no header: a backend
	// that does not expect one would take it for payload.
	if pp := limit("proxy_protocol", vals[11]); pp <= 2 {
		b.ProxyProtocol = max(pp, 0)
	} else {
		bad("proxy_protocol", vals[11], "must be 0 (none), 1 (PROXY v1) or 2 (PROXY v2)")
	}
	return b, false, errs
}

// checkID is the rule for every row id (backends and pops): the id names
// the row in logs, metrics labels and the BPF maps, so it must be text those
// can all carry whole. It returns why id is refused, or "".
func checkID(id string) string {
	switch {
	case strings.TrimSpace(id) == "":
		return "must not be empty"
	case !utf8.ValidString(id):
		return "must be valid UTF-8"
	case strings.IndexByte(id, 0) >= 0:
		// The BPF maps end the id at the first NUL: two ids sharing a
		// prefix would collide there.
		return "must not contain a NUL byte"
	case len(id) > MaxIDLen:
		return fmt.Sprintf("is %d bytes long, at most %d fit the BPF maps' id field", len(id), MaxIDLen)
	}
	return ""
}

// checkBackendAddr refuses addresses no connection can be dialled to. It
// returns why, or "". addr is already unmapped.
func checkBackendAddr(addr netip.Addr) string {
	switch {
	case addr.IsUnspecified():
		return "must not be unspecified: " + addr.String() + " means any address, not a backend"
	case addr.IsMulticast():
		return "must not be a multicast address: TCP cannot connect to a group"
	case addr == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "must not be the broadcast address"
	case addr.Is6() && addr.IsLinkLocalUnicast() && addr.Zone() == "":
		// fe80::/10 exists on every interface; without a zone the kernel
		// cannot tell which link to dial on.
		return "a link-local address needs a zone naming its interface, e.g. " + addr.String() + "%eth0"
	}
	return ""
}

// dropDuplicates skips every row of an id that appears more than once: with
// no PRIMARY KEY on id (the seed's table may lack one) SQLite allows it, and
// no single copy can be chosen on merit.
func dropDuplicates(bs []Backend) ([]Backend, []RowError) {
	count := make(map[string]int, len(bs))
	for _, b := range bs {
		count[b.ID]++
	}
	var errs []RowError
	kept := bs[:0]
	for _, b := range bs {
		if count[b.ID] > 1 {
			errs = append(errs, RowError{Table: "backends", ID: b.ID, Column: "id", Value: b.ID,
				Reason: fmt.Sprintf("duplicate id (%d rows): all skipped", count[b.ID])})
			continue
		}
		kept = append(kept, b)
	}
	slices.SortFunc(errs, func(a, b RowError) int { return strings.Compare(a.ID, b.ID) })
	return kept, errs
}

// loadRegions reads the optional regions table. Its absence is not an error:
// the built-in map then applies alone.
func loadRegions(ctx context.Context, tx *sql.Tx) (map[string]string, []RowError, error) {
	cols, err := TableColumns(ctx, tx, "regions")
	if err != nil || len(cols) == 0 {
		return nil, nil, err
	}
	for _, c := range []string{"country", "region"} {
		if _, ok := cols[c]; !ok {
			return nil, nil, fmt.Errorf("regions table has no column %s", c)
		}
	}
	rows, err := tx.QueryContext(ctx, "SELECT "+quoteIdent(cols["country"])+", "+quoteIdent(cols["region"])+" FROM regions")
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	overrides := make(map[string]string)
	var errs []RowError
	for rows.Next() {
		var country, region any
		if err := rows.Scan(&country, &region); err != nil {
			return nil, nil, err
		}
		c, r, bad := parseRegion(country, region)
		if bad != nil {
			errs = append(errs, *bad)
			continue
		}
		overrides[c] = r
	}
	return overrides, errs, rows.Err()
}

// parseRegion validates one regions row and normalizes its case.
func parseRegion(country, region any) (c, r string, bad *RowError) {
	c, r = normalizeCountry(text(country)), normalizeRegion(text(region))
	switch {
	case c == "":
		return "", "", &RowError{Table: "regions", ID: c, Column: "country", Value: valueText(country), Reason: "must not be empty"}
	case r == "":
		return "", "", &RowError{Table: "regions", ID: c, Column: "region", Value: valueText(region), Reason: "must not be empty"}
	}
	return c, r, nil
}

// text reads a TEXT-ish column; NULL is "".
func text(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	case []byte:
		return string(v)
	}
	return valueText(v)
}

// valueText shows a value as the sqlite3 shell would, for RowError.Value.
func valueText(v any) string {
	switch v := v.(type) {
	case nil:
		return "NULL"
	case string:
		return v
	case []byte:
		return string(v)
	case int64:
		return strconv.FormatInt(v, 10)
	case float64:
		return strconv.FormatFloat(v, 'g', -1, 64)
	case bool:
		if v {
			return "1"
		}
		return "0"
	}
	return fmt.Sprint(v)
}

// integer reads an INTEGER column the way a person writing the row meant
// it: 8080, 8080.0 and '8080' are all 8080; 80.5 and 'http' are not integers.
func integer(v any) (int64, bool) {
	switch v := v.(type) {
	case int64:
		return v, true
	case float64:
		if v != math.Trunc(v) || v < math.MinInt64 || v >= math.MaxInt64 {
			return 0, false
		}
		return int64(v), true
	case bool:
		if v {
			return 1, true
		}
		return 0, true
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		return n, err == nil
	case []byte:
		n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
		return n, err == nil
	}
	return 0, false
}

// truth reads a boolean column with SQLite's rule: non-zero is true. NULL is
// false; callers that want another default check for nil first.
func truth(v any) (bool, bool) {
	if v == nil {
		return false, true
	}
	n, ok := integer(v)
	return n != 0, ok
}
