package wgmesh

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// Pop is one valid, not deleted row of the pops table: a POP or backend host
// of the overlay.
type Pop struct {
	ID     string
	Region string
	// PublicKey is the host's WireGuard public key.
	PublicKey wgtypes.Key
	// Endpoint is host:port of its WireGuard listener; empty when the host
	// only dials in (its endpoint is then learned from its handshakes).
	Endpoint string
	// WGIP is its overlay address; it lies inside AllowedIPs.
	WGIP netip.Addr
	// AllowedIPs are the prefixes routed to it, masked, in table order.
	AllowedIPs []netip.Prefix
}

// popsTable is the table's name in routing.db and in row errors.
const popsTable = "pops"

// popColumns is the contract's column order. Only id, wg_public_key, wg_ip
// and allowed_ips are required: a table without region, endpoint or deleted
// reads them as NULL.
var popColumns = []string{"id", "region", "wg_public_key", "endpoint", "wg_ip", "allowed_ips", "deleted"}

var requiredPopColumns = map[string]bool{"id": true, "wg_public_key": true, "wg_ip": true, "allowed_ips": true}

// loadTimeout bounds one read, busy waits included, so a wedged writer
// cannot stall a reconcile forever.
const loadTimeout = 10 * time.Second

// LoadPops reads the pops table of the routing database at dbPath,
// read-only. A database without a pops table has no pops; that is not an
// error, so a POP without an overlay needs no schema change.
//
// Each row is validated; a bad row is skipped and reported in the returned
// []error as a routing.RowError naming the table, row id, column and value.
// Rows with deleted non-zero are left out silently. Pops come back sorted
// by id. The error is for the database as a whole (missing, not SQLite, a
// required column missing).
func LoadPops(dbPath string) ([]Pop, []error, error) {
	db, err := routing.OpenReadOnly(dbPath)
	if err != nil {
		return nil, nil, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	pops, rowErrs, err := loadPops(ctx, db)
	if err != nil {
		return nil, nil, fmt.Errorf("read routing db %s: %w", dbPath, err)
	}
	return pops, rowErrs, nil
}

func loadPops(ctx context.Context, db *sql.DB) ([]Pop, []error, error) {
	tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, nil, err
	}
	defer tx.Rollback() // read-only: ending it is all Rollback does

	cols, err := routing.TableColumns(ctx, tx, popsTable)
	if err != nil {
		return nil, nil, err
	}
	if len(cols) == 0 {
		return nil, nil, nil
	}
	selects := make([]string, len(popColumns))
	for i, c := range popColumns {
		declared, ok := cols[c]
		switch {
		case ok:
			selects[i] = `"` + strings.ReplaceAll(declared, `"`, `""`) + `"`
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
		rowErrs []error
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
		p, deleted, err := parsePop(vals)
		switch {
		case err != nil:
			rowErrs = append(rowErrs, err)
		case !deleted:
			pops = append(pops, p)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("pops: %w", err)
	}
	pops, conflicts := dropConflicts(pops)
	return pops, append(rowErrs, conflicts...), nil
}

// ParsePopRow validates one row given as text, in the contract's column
// order without deleted: id, region, wg_public_key, endpoint, wg_ip,
// allowed_ips. It is the validation LoadPops applies, for tests and tools
// that build rows by hand.
func ParsePopRow(id, region, publicKey, endpoint, wgIP, allowedIPs string) (Pop, error) {
	p, _, err := parsePop([]any{id, region, publicKey, endpoint, wgIP, allowedIPs, nil})
	return p, err
}

// parsePop validates one row in popColumns order. The first bad column
// makes the whole row an error: a peer half right is a peer routed wrong.
func parsePop(v []any) (p Pop, deleted bool, err error) {
	id, idNull := text(v[0])
	bad := func(col string, val any, reason string) error {
		s, _ := text(val)
		if val == nil {
			s = "NULL"
		}
		return routing.RowError{Table: popsTable, ID: id, Column: col, Value: s, Reason: reason}
	}
	if idNull || strings.TrimSpace(id) == "" {
		return Pop{}, false, bad("id", v[0], "empty id")
	}
	p.ID = id
	p.Region, _ = text(v[1])

	del, err := truth(v[6])
	if err != nil {
		return Pop{}, false, bad("deleted", v[6], err.Error())
	}
	if del {
		// A deleted row is not validated: it is on its way out, and a
		// typo in it must not be reported as if it mattered.
		return p, true, nil
	}

	key, null := text(v[2])
	if null || key == "" {
		return Pop{}, false, bad("wg_public_key", v[2], "a public key is required")
	}
	if p.PublicKey, err = parseKey(key); err != nil {
		return Pop{}, false, bad("wg_public_key", v[2], err.Error())
	}

	ep, _ := text(v[3])
	ep = strings.TrimSpace(ep)
	if ep != "" {
		if err := checkEndpoint(ep); err != nil {
			return Pop{}, false, bad("endpoint", v[3], err.Error())
		}
	}
	p.Endpoint = ep

	ip, _ := text(v[4])
	if p.WGIP, err = netip.ParseAddr(strings.TrimSpace(ip)); err != nil {
		return Pop{}, false, bad("wg_ip", v[4], "not an IP address")
	}
	p.WGIP = p.WGIP.Unmap()

	list, _ := text(v[5])
	for s := range strings.SplitSeq(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return Pop{}, false, bad("allowed_ips", v[5], fmt.Sprintf("%q is not a CIDR prefix", s))
		}
		if pfx != pfx.Masked() {
			// Almost always a typo for a host route or for the network:
			// refuse rather than guess which.
			return Pop{}, false, bad("allowed_ips", v[5], fmt.Sprintf("%s has host bits set: write %s or %s/%d", s, pfx.Masked(), pfx.Addr(), pfx.Addr().BitLen()))
		}
		p.AllowedIPs = append(p.AllowedIPs, pfx)
	}
	if len(p.AllowedIPs) == 0 {
		return Pop{}, false, bad("allowed_ips", v[5], "no prefix: the host would receive no traffic")
	}
	if !slices.ContainsFunc(p.AllowedIPs, func(q netip.Prefix) bool { return q.Contains(p.WGIP) }) {
		// WireGuard drops what is sent to an address outside every
		// peer's allowed IPs, so the overlay address would be dead.
		return Pop{}, false, bad("allowed_ips", v[5], fmt.Sprintf("does not contain wg_ip %s: add %s/%d", p.WGIP, p.WGIP, p.WGIP.BitLen()))
	}
	return p, false, nil
}

// parseKey accepts what `wg genkey | wg pubkey` and `edgeproxy wg keygen`
// print: standard base64 of 32 bytes.
func parseKey(s string) (wgtypes.Key, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return wgtypes.Key{}, errors.New("not base64")
	}
	if len(b) != wgtypes.KeyLen {
		return wgtypes.Key{}, fmt.Errorf("decodes to %d bytes, want %d", len(b), wgtypes.KeyLen)
	}
	return wgtypes.Key(b), nil
}

// checkEndpoint accepts host:port with a host name or an IP address
// (IPv6 in brackets) and a port 1-65535.
func checkEndpoint(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("not host:port")
	}
	if host == "" {
		return errors.New("empty host")
	}
	if strings.ContainsAny(host, " \t/") {
		return fmt.Errorf("host %q is neither an IP address nor a host name", host)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not 1-65535", port)
	}
	return nil
}

// dropConflicts sorts by id and skips, in that order, a row repeating an
// id, repeating a public key, or claiming a prefix that overlaps an earlier
// row's: WireGuard would silently give the shared key or prefix to
// whichever peer it configured last.
func dropConflicts(pops []Pop) ([]Pop, []error) {
	slices.SortStableFunc(pops, func(a, b Pop) int { return strings.Compare(a.ID, b.ID) })
	var (
		kept []Pop
		errs []error
	)
	ids := map[string]bool{}
	keys := map[wgtypes.Key]string{}
next:
	for _, p := range pops {
		if ids[p.ID] {
			errs = append(errs, routing.RowError{Table: popsTable, ID: p.ID, Column: "id", Value: p.ID, Reason: "duplicate id"})
			continue
		}
		if other, ok := keys[p.PublicKey]; ok {
			errs = append(errs, routing.RowError{Table: popsTable, ID: p.ID, Column: "wg_public_key", Value: p.PublicKey.String(), Reason: "same key as row " + strconv.Quote(other)})
			continue
		}
		for _, k := range kept {
			for _, a := range p.AllowedIPs {
				for _, b := range k.AllowedIPs {
					if a.Overlaps(b) {
						errs = append(errs, routing.RowError{Table: popsTable, ID: p.ID, Column: "allowed_ips", Value: joinPrefixes(p.AllowedIPs),
							Reason: fmt.Sprintf("%s overlaps %s of row %q", a, b, k.ID)})
						continue next
					}
				}
			}
		}
		ids[p.ID] = true
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

// text reads a SQLite value as text; null reports SQL NULL.
func text(v any) (s string, null bool) {
	switch x := v.(type) {
	case nil:
		return "", true
	case string:
		return x, false
	case []byte:
		return string(x), false
	case int64:
		return strconv.FormatInt(x, 10), false
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64), false
	default:
		return fmt.Sprint(x), false
	}
}

// truth follows SQLite's rule for a flag: NULL and 0 are false, any other
// number is true; numeric text counts as its number.
func truth(v any) (bool, error) {
	switch x := v.(type) {
	case nil:
		return false, nil
	case int64:
		return x != 0, nil
	case float64:
		return x != 0 && !math.IsNaN(x), nil
	case bool:
		return x, nil
	}
	s, _ := text(v)
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil {
		return false, errors.New("not a number")
	}
	return f != 0, nil
}
