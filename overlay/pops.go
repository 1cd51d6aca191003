package overlay

import (
	"github.com/edgeproxy/edgeproxy/routing"
)

// Pop is one valid, not deleted row of the pops table. routing reads and
// validates that table with the rest of routing.db (one reader, one set of
// rules); the mesh only applies what it was given.
type Pop = routing.Pop

// LoadPops reads the pops table of the routing database at dbPath with
// routing.LoadPops and no host checks, for `edgeproxy wg status` (which
// only names peers by their rows) and for tests that drive a mesh by hand.
// Skipped rows come back as routing.RowErrors. The running proxy does not
// call it: its routing store reads pops with the backends and hands each
// table to Mesh.Apply.
func LoadPops(dbPath string) ([]Pop, []error, error) {
	pops, rowErrs, err := routing.LoadPops(dbPath, routing.LoadOptions{})
	if err != nil {
		return nil, nil, err
	}
	return pops, asErrors(rowErrs), nil
}

// ParsePopRow is routing.ParsePopRow: one row's validation, for tests and
// tools that build rows by hand.
func ParsePopRow(id, region, publicKey, endpoint, wgIP, allowedIPs string) (Pop, error) {
	return routing.ParsePopRow(id, region, publicKey, endpoint, wgIP, allowedIPs)
}

func asErrors(rowErrs []routing.RowError) []error {
	if len(rowErrs) == 0 {
		return nil
	}
	errs := make([]error, len(rowErrs))
	for i, re := range rowErrs {
		errs[i] = re
	}
	return errs
}
