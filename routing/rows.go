package routing

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// The tables of routing.db by name, as row errors, etcd keys
// (PREFIX/backends/<id>, PREFIX/pops/<id>, PREFIX/regions/<country>) and
// Change name them.
const (
	TableBackends = "backends"
	TablePops     = popsTable
	TableRegions  = "regions"
)

// Rows are the valid rows of routing.db's three tables as rows rather than
// as a routing snapshot: what a fleet keeps in etcd, what `edgeproxy ctl
// import` reads and `ctl export` writes. Rows marked deleted are left out.
type Rows struct {
	Backends []Backend         // sorted by ID
	Pops     []Pop             // sorted by ID
	Regions  map[string]string // the regions table alone: upper-case country -> lower-case region
}

// ReadRows reads the three tables of the routing database at path,
// read-only and in one transaction, with LoadTable's rules: bad rows are
// skipped and returned, deleted rows are left out. Host-specific checks
// (LoadOptions) are not applied: the rows are for another host to load.
func ReadRows(path string) (Rows, []RowError, error) {
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	db, err := OpenReadOnly(path)
	if err != nil {
		return Rows{}, nil, err
	}
	defer db.Close()
	r, err := readRows(ctx, db, path, LoadOptions{})
	if err != nil {
		return Rows{}, nil, err
	}
	out := Rows{Backends: r.backends, Pops: r.pops, Regions: r.regions}
	slices.SortFunc(out.Backends, func(a, b Backend) int { return strings.Compare(a.ID, b.ID) })
	return out, r.errs, nil
}

// A row travels as a JSON object whose names are the columns of its table
// (deleted excepted: a row leaves by deleting its key) and whose values are
// what the column would hold. ParseBackendJSON, ParsePopJSON and
// ParseRegionJSON read one back with exactly the rules of a row of
// routing.db, so a value valid in etcd is a row valid in the file.

// backendJSON is a backends row in JSON; healthy is 0 or 1, as in SQLite.
type backendJSON struct {
	ID        string `json:"id"`
	App       string `json:"app"`
	Region    string `json:"region"`
	Country   string `json:"country"`
	WGIP      string `json:"wg_ip"`
	Port      uint16 `json:"port"`
	Healthy   int    `json:"healthy"`
	Weight    int    `json:"weight"`
	SoftLimit int    `json:"soft_limit"`
	HardLimit int    `json:"hard_limit"`
	// ProxyProtocol is left out when 0, so rows written before the
	// column existed and rows without a header read alike.
	ProxyProtocol int `json:"proxy_protocol,omitempty"`
}

// MarshalBackend is b as a JSON row.
func MarshalBackend(b Backend) []byte {
	healthy := 0
	if b.Healthy {
		healthy = 1
	}
	return mustMarshal(backendJSON{ID: b.ID, App: b.App, Region: b.Region, Country: b.Country, WGIP: b.Addr.String(),
		Port: b.Port, Healthy: healthy, Weight: b.Weight, SoftLimit: b.SoftLimit, HardLimit: b.HardLimit,
		ProxyProtocol: b.ProxyProtocol})
}

type popJSON struct {
	ID         string `json:"id"`
	Region     string `json:"region"`
	PublicKey  string `json:"wg_public_key"`
	Endpoint   string `json:"endpoint"`
	WGIP       string `json:"wg_ip"`
	AllowedIPs string `json:"allowed_ips"`
}

// MarshalPop is p as a JSON row; allowed_ips is comma-separated, as in the
// column.
func MarshalPop(p Pop) []byte {
	return mustMarshal(popJSON{ID: p.ID, Region: p.Region, PublicKey: p.PublicKey.String(), Endpoint: p.Endpoint,
		WGIP: p.WGIP.String(), AllowedIPs: joinPrefixes(p.AllowedIPs)})
}

type regionJSON struct {
	Country string `json:"country"`
	Region  string `json:"region"`
}

// MarshalRegion is one regions row as JSON.
func MarshalRegion(country, region string) []byte {
	return mustMarshal(regionJSON{Country: normalizeCountry(country), Region: normalizeRegion(region)})
}

func mustMarshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("marshal %T: %v", v, err)) // plain strings and integers always marshal
	}
	return b
}

// ParseBackendJSON validates a backends row given as JSON, for the row
// whose id is id (from its key). A column left out is NULL; an "id" in the
// value must equal id. The error joins every bad column's RowError
// (errors.As finds each).
func ParseBackendJSON(id string, value []byte) (Backend, error) {
	vals, errs := decodeRow(TableBackends, id, value, backendColumns)
	if len(errs) > 0 {
		return Backend{}, joinRowErrors(errs)
	}
	b, _, errs := parseBackend(vals, nil)
	if len(errs) > 0 {
		return Backend{}, joinRowErrors(errs)
	}
	return b, nil
}

// ParsePopJSON validates a pops row given as JSON, as ParseBackendJSON
// does a backends row. The checks across rows (a key or prefix two rows
// share) and against this host's addresses are the loader's.
func ParsePopJSON(id string, value []byte) (Pop, error) {
	vals, errs := decodeRow(TablePops, id, value, popColumns)
	if len(errs) > 0 {
		return Pop{}, joinRowErrors(errs)
	}
	p, _, errs := parsePop(vals)
	if len(errs) > 0 {
		return Pop{}, joinRowErrors(errs)
	}
	return p, nil
}

// ParseRegionJSON validates a regions row given as JSON for country (from
// its key) and returns the country upper-case and the region lower-case.
func ParseRegionJSON(country string, value []byte) (string, string, error) {
	vals, errs := decodeRowKeyed(TableRegions, "country", country, value, []string{"country", "region"})
	if len(errs) > 0 {
		return "", "", joinRowErrors(errs)
	}
	c, r, bad := parseRegion(vals[0], vals[1])
	if bad != nil {
		return "", "", *bad
	}
	return c, r, nil
}

// decodeRow reads value into columns order, with the id taken from the
// key; "deleted" is no column of a JSON row.
func decodeRow(table, id string, value []byte, columns []string) ([]any, []RowError) {
	return decodeRowKeyed(table, "id", id, value, columns)
}

// jsonColumn names a RowError about the value as a whole.
const jsonColumn = "(json)"

func decodeRowKeyed(table, keyColumn, key string, value []byte, columns []string) ([]any, []RowError) {
	bad := func(col, val, reason string) RowError {
		return RowError{Table: table, ID: key, Column: col, Value: val, Reason: reason}
	}
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.UseNumber()
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil || obj == nil {
		reason := "must be a JSON object"
		if err != nil {
			reason += ": " + err.Error()
		}
		return nil, []RowError{bad(jsonColumn, shorten(string(value)), reason)}
	}
	if dec.More() {
		return nil, []RowError{bad(jsonColumn, shorten(string(value)), "must be one JSON object, found more after it")}
	}
	index := make(map[string]int, len(columns))
	for i, c := range columns {
		if c != "deleted" {
			index[c] = i
		}
	}
	vals := make([]any, len(columns))
	var errs []RowError
	for _, name := range slices.Sorted(maps.Keys(obj)) {
		v := obj[name]
		i, ok := index[name]
		if !ok {
			reason := fmt.Sprintf("no such column in %s (columns: %s)", table, strings.Join(slices.Sorted(maps.Keys(index)), ", "))
			if name == "deleted" {
				reason = "not part of a JSON row: delete the key to delete the row"
			}
			errs = append(errs, bad(name, shorten(fmt.Sprint(v)), reason))
			continue
		}
		switch x := v.(type) {
		case nil, string, bool:
			vals[i] = x
		case json.Number:
			if n, err := x.Int64(); err == nil {
				vals[i] = n
			} else if f, err := x.Float64(); err == nil {
				vals[i] = f
			} else {
				vals[i] = x.String()
			}
		default:
			errs = append(errs, bad(name, shorten(fmt.Sprint(v)), "must be a number, text, true, false or null"))
		}
	}
	k := index[keyColumn]
	if vals[k] != nil && !sameKey(keyColumn, text(vals[k]), key) {
		errs = append(errs, bad(keyColumn, valueText(vals[k]), fmt.Sprintf("does not match the key's %s %q", keyColumn, key)))
	}
	vals[k] = key
	return vals, errs
}

// sameKey compares a row's id (exactly) or country (in any case).
func sameKey(column, a, b string) bool {
	if column == "country" {
		return normalizeCountry(a) == normalizeCountry(b)
	}
	return a == b
}

// shorten keeps a bad value readable in a log line.
func shorten(s string) string {
	const max = 200
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}

// PopConflicts applies the checks across pops rows that the loader
// applies (an id twice, a public key two rows share, allowed IPs that
// overlap) and returns a RowError for each row the loader would skip.
// Rows are taken in id order: of two that conflict, the later id is
// skipped.
func PopConflicts(pops []Pop) []RowError {
	_, errs := dropPopConflicts(slices.Clone(pops))
	return errs
}
