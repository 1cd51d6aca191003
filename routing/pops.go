package routing

import (
	"context"
	"database/sql"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// WGKey is a WireGuard public key: 32 bytes, written in routing.db as
// standard base64 (what `wg pubkey` and `edgeproxy wg keygen` print). It
// converts to wgtypes.Key as it is; routing does not import wgtypes, which
// pulls in net.
type WGKey [32]byte

// String is the key in base64, as routing.db holds it.
func (k WGKey) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// Pop is one valid, not deleted row of the pops table: a POP or backend
// host of the WireGuard overlay.
type Pop struct {
	ID     string
	Region string
	// PublicKey is the host's WireGuard public key.
	PublicKey WGKey
	// Endpoint is host:port of its WireGuard listener; empty when the host
	// only dials in (its endpoint is then learned from its handshakes).
	Endpoint string
	// WGIP is its overlay address; it lies inside AllowedIPs.
	WGIP netip.Addr
	// AllowedIPs are the prefixes routed to it, masked, in row order.
	AllowedIPs []netip.Prefix
}

// popsTable is the table's name in routing.db and in row errors.
const popsTable = "pops"

// popColumns is the contract's column order. Only id, wg_public_key, wg_ip
// and allowed_ips are required: a table without region, endpoint or deleted
// reads them as NULL.
var popColumns = []string{"id", "region", "wg_public_key", "endpoint", "wg_ip", "allowed_ips", "deleted"}

var requiredPopColumns = map[string]bool{"id": true, "wg_public_key": true, "wg_ip": true, "allowed_ips": true}

// LoadPops reads only the pops table of the routing database at path,
// read-only, with the rules LoadTableWith applies to Table.Pops: tools such
// as `edgeproxy wg status` use it on a database that may have no backends.
//
// A database without a pops table has no pops; that is not an error, so a
// POP without an overlay needs no schema change. Bad rows are skipped and
// returned as RowErrors, with the backends table's rules for ids, integers
// and truth (deleted 0.5 is an error, not a deletion). Rows with deleted
// non-zero are left out silently and not validated beyond their id. Pops
// come back sorted by id. The error is for the database as a whole
// (missing, not SQLite, a required column missing).
func LoadPops(path string, opts LoadOptions) ([]Pop, []RowError, error) {
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	var hostAddrs []netip.Addr
	if opts.HostAddrs != nil {
		hostAddrs = opts.HostAddrs()
	}
	db, err := OpenReadOnly(path)
	if err != nil {
		return nil, nil, err
	}
	defer db.Close()
	tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, nil, fmt.Errorf("read routing db %s: %w", path, err)
	}
	defer tx.Rollback() // read-only: ending it is all Rollback does
	pops, rowErrs, err := readPops(ctx, tx, opts.PopID, hostAddrs)
	if err != nil {
		return nil, nil, fmt.Errorf("read routing db %s: %w", path, err)
	}
	return pops, rowErrs, nil
}

// readPops reads and validates the pops table inside tx.
func readPops(ctx context.Context, tx *sql.Tx, selfID string, hostAddrs []netip.Addr) ([]Pop, []RowError, error) {
	cols, err := TableColumns(ctx, tx, popsTable)
	if err != nil {
		return nil, nil, fmt.Errorf("pops: %w", err)
	}
	if len(cols) == 0 {
		return nil, nil, nil
	}
	selects := make([]string, len(popColumns))
	for i, c := range popColumns {
		declared, ok := cols[c]
		switch {
		case ok:
			selects[i] = quoteIdent(declared)
		case requiredPopColumns[c]:
			return nil, nil, fmt.Errorf("pops table has no column %s", c)
		default:
			selects[i] = "NULL"
		}
	}
	rows, err := tx.QueryContext(ctx, "SELECT "+strings.Join(selects, ", ")+" FROM pops")
	if err != nil {
		return nil, nil, fmt.Errorf("pops: %w", err)
	}
	defer rows.Close()
	var (
		pops    []Pop
		rowErrs []RowError
	)
	vals := make([]any, len(popColumns))
	ptrs := make([]any, len(vals))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	for rows.Next() {
		if err := rows.Scan(ptrs...); err != nil {
			return nil, nil, fmt.Errorf("pops: %w", err)
		}
		p, deleted, errs := parsePop(vals)
		if len(errs) == 0 && !deleted && p.ID != selfID {
			errs = checkHostAddrs(p, vals[5], hostAddrs)
		}
		switch {
		case len(errs) > 0:
			rowErrs = append(rowErrs, errs...)
		case !deleted:
			pops = append(pops, p)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("pops: %w", err)
	}
	pops, conflicts := dropPopConflicts(pops)
	return pops, append(rowErrs, conflicts...), nil
}

// ParsePopRow validates one row given as text, in the contract's column
// order without deleted: id, region, wg_public_key, endpoint, wg_ip,
// allowed_ips. It applies the per-row rules of LoadPops (not the checks
// across rows, nor those that need LoadOptions), for tests and tools that
// build rows by hand; the error joins every bad column's RowError.
func ParsePopRow(id, region, publicKey, endpoint, wgIP, allowedIPs string) (Pop, error) {
	p, _, errs := parsePop([]any{id, region, publicKey, endpoint, wgIP, allowedIPs, nil})
	if len(errs) > 0 {
		return Pop{}, joinRowErrors(errs)
	}
	return p, nil
}

// rowErrors is several RowErrors of one row as one error; errors.As finds
// each.
type rowErrors []RowError

func (e rowErrors) Error() string {
	s := make([]string, len(e))
	for i, re := range e {
		s[i] = re.Error()
	}
	return strings.Join(s, "; ")
}

func (e rowErrors) Unwrap() []error {
	out := make([]error, len(e))
	for i, re := range e {
		out[i] = re
	}
	return out
}

func joinRowErrors(errs []RowError) error {
	if len(errs) == 1 {
		return errs[0]
	}
	return rowErrors(errs)
}

// parsePop validates one row in popColumns order. Like parseBackend it
// reports every bad column, and any makes the whole row skipped: a peer
// half right is a peer routed wrong.
func parsePop(v []any) (p Pop, deleted bool, errs []RowError) {
	p.ID = text(v[0])
	bad := func(col string, val any, reason string) {
		errs = append(errs, RowError{Table: popsTable, ID: p.ID, Column: col, Value: valueText(val), Reason: reason})
	}
	if reason := checkID(p.ID); reason != "" {
		bad("id", v[0], reason)
		return p, false, errs
	}
	del, ok := truth(v[6])
	if !ok {
		bad("deleted", v[6], "must be an integer")
		return p, false, errs
	}
	if del {
		// A deleted row is not validated: it is on its way out, and a
		// typo in it must not be reported as if it mattered.
		return p, true, nil
	}
	p.Region = normalizeRegion(text(v[1]))

	if key := strings.TrimSpace(text(v[2])); key == "" {
		bad("wg_public_key", v[2], "a public key is required")
	} else if k, reason := parseWGKey(key); reason != "" {
		bad("wg_public_key", v[2], reason)
	} else {
		p.PublicKey = k
	}

	if ep := strings.TrimSpace(text(v[3])); ep != "" {
		if reason := checkEndpoint(ep); reason != "" {
			bad("endpoint", v[3], reason)
		}
		p.Endpoint = ep
	}

	ipOK := false
	if ip, err := netip.ParseAddr(strings.TrimSpace(text(v[4]))); err != nil {
		bad("wg_ip", v[4], "must be an IP address")
	} else if p.WGIP = ip.Unmap(); p.WGIP.Zone() != "" {
		bad("wg_ip", v[4], "must not have a zone: an overlay address belongs to no one link")
	} else if p.WGIP.IsUnspecified() || p.WGIP.IsMulticast() {
		bad("wg_ip", v[4], "must be a unicast address of the host")
	} else {
		ipOK = true
	}

	list := text(v[5])
	for s := range strings.SplitSeq(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(s)
		switch {
		case err != nil:
			bad("allowed_ips", v[5], fmt.Sprintf("%q is not a CIDR prefix", s))
			return p, false, errs
		case pfx != pfx.Masked():
			// Almost always a typo for a host route or for the network:
			// refuse rather than guess which.
			bad("allowed_ips", v[5], fmt.Sprintf("%s has host bits set: write %s or %s/%d", s, pfx.Masked(), pfx.Addr(), pfx.Addr().BitLen()))
			return p, false, errs
		case pfx.Bits() == 0:
			// Every packet of the host would go into the tunnel, the
			// underlay's included: the mesh would cut itself off.
			bad("allowed_ips", v[5], fmt.Sprintf("%s is a default route: the overlay would take all of this host's traffic", s))
			return p, false, errs
		}
		p.AllowedIPs = append(p.AllowedIPs, pfx)
	}
	switch {
	case len(p.AllowedIPs) == 0:
		bad("allowed_ips", v[5], "no prefix: the host would receive no traffic")
	case ipOK && !slices.ContainsFunc(p.AllowedIPs, func(q netip.Prefix) bool { return q.Contains(p.WGIP) }):
		// WireGuard drops what is sent to an address outside every
		// peer's allowed IPs, so the overlay address would be dead.
		bad("allowed_ips", v[5], fmt.Sprintf("does not contain wg_ip %s: add %s/%d", p.WGIP, p.WGIP, p.WGIP.BitLen()))
	}
	return p, false, errs
}

// checkHostAddrs refuses a peer whose allowed IPs cover one of this host's
// own addresses: the mesh would route to it what is meant for this host's
// own links (its underlay among them).
func checkHostAddrs(p Pop, val any, hostAddrs []netip.Addr) []RowError {
	for _, pfx := range p.AllowedIPs {
		for _, a := range hostAddrs {
			// Prefix.Contains never matches a zoned address.
			if a = a.WithZone("").Unmap(); pfx.Contains(a) {
				return []RowError{{Table: popsTable, ID: p.ID, Column: "allowed_ips", Value: valueText(val),
					Reason: fmt.Sprintf("%s covers %s, an address of this host", pfx, a)}}
			}
		}
	}
	return nil
}

// parseWGKey accepts standard base64 of 32 bytes.
func parseWGKey(s string) (WGKey, string) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return WGKey{}, "must be base64"
	}
	if len(b) != len(WGKey{}) {
		return WGKey{}, fmt.Sprintf("decodes to %d bytes, want %d", len(b), len(WGKey{}))
	}
	return WGKey(b), ""
}

// checkEndpoint accepts host:port with a host name or an IP address
// (IPv6 in brackets) and a port 1-65535. It returns why s is refused, or
// "". It splits as net.SplitHostPort does, which routing may not import.
func checkEndpoint(s string) string {
	var host, port string
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 || !strings.HasPrefix(s[end+1:], ":") {
			return "must be host:port"
		}
		host, port = s[1:end], s[end+2:]
		if _, err := netip.ParseAddr(host); err != nil || !strings.Contains(host, ":") {
			return fmt.Sprintf("[%s] is not an IPv6 address", host)
		}
	} else {
		i := strings.LastIndexByte(s, ':')
		if i < 0 {
			return "must be host:port"
		}
		host, port = s[:i], s[i+1:]
		if strings.Contains(host, ":") {
			return "must be host:port, an IPv6 address in brackets"
		}
	}
	if host == "" {
		return "must be host:port with a host"
	}
	if strings.ContainsAny(host, " \t/[]") {
		return fmt.Sprintf("host %q is neither an IP address nor a host name", host)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Sprintf("port %q is not 1-65535", port)
	}
	return ""
}

// dropPopConflicts sorts by id and skips every row of an id that appears
// more than once (as dropDuplicates does for backends), then, in id order,
// a row repeating an earlier row's public key or claiming a prefix that
// overlaps an earlier row's: WireGuard would silently give the shared key
// or prefix to whichever peer it configured last.
func dropPopConflicts(pops []Pop) ([]Pop, []RowError) {
	slices.SortStableFunc(pops, func(a, b Pop) int { return strings.Compare(a.ID, b.ID) })
	count := make(map[string]int, len(pops))
	for _, p := range pops {
		count[p.ID]++
	}
	var (
		kept []Pop
		errs []RowError
	)
	keys := map[WGKey]string{}
next:
	for _, p := range pops {
		if n := count[p.ID]; n > 1 {
			errs = append(errs, RowError{Table: popsTable, ID: p.ID, Column: "id", Value: p.ID,
				Reason: fmt.Sprintf("duplicate id (%d rows): all skipped", n)})
			continue
		}
		if other, ok := keys[p.PublicKey]; ok {
			errs = append(errs, RowError{Table: popsTable, ID: p.ID, Column: "wg_public_key", Value: p.PublicKey.String(),
				Reason: "same key as row " + strconv.Quote(other)})
			continue
		}
		for _, k := range kept {
			for _, a := range p.AllowedIPs {
				for _, b := range k.AllowedIPs {
					if a.Overlaps(b) {
						errs = append(errs, RowError{Table: popsTable, ID: p.ID, Column: "allowed_ips", Value: joinPrefixes(p.AllowedIPs),
							Reason: fmt.Sprintf("%s overlaps %s of row %q", a, b, k.ID)})
						continue next
					}
				}
			}
		}
		keys[p.PublicKey] = p.ID
		kept = append(kept, p)
	}
	return kept, errs
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
