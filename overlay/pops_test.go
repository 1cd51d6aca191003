package overlay

import (
	"database/sql"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/edgeproxy/edgeproxy/routing"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// testKey is a deterministic public key, distinct per n.
func testKey(n byte) wgtypes.Key {
	var k wgtypes.Key
	for i := range k {
		k[i] = n
	}
	return k
}

// writePops makes a routing.db with routing's own schema and rows inserted
// into pops.
func writePops(t *testing.T, rows ...[]any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "routing.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := routing.InitSchema(t.Context(), db); err != nil {
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

func ids(pops []Pop) []string {
	var out []string
	for _, p := range pops {
		out = append(out, p.ID)
	}
	return out
}

// TestLoadPopsIsRoutingsReader: the rules live in routing (tested there);
// the mesh's LoadPops must give the same answer, row errors included.
func TestLoadPopsIsRoutingsReader(t *testing.T) {
	path := writePops(t,
		[]any{"pop-b", "eu", testKey(2).String(), "192.0.2.2:51820", "10.50.2.1", "10.50.2.1/32", 0},
		[]any{"pop-a", "sa", testKey(1).String(), "", "10.50.1.1", "10.50.1.1/32", nil},
		[]any{"half", "sa", testKey(3).String(), "", "10.50.3.1", "10.50.3.1/32", 0.5},
		[]any{"default", "sa", testKey(4).String(), "", "10.50.4.1", "0.0.0.0/0", 0},
	)
	pops, errs, err := LoadPops(path)
	if err != nil {
		t.Fatal(err)
	}
	want, wantErrs, err := routing.LoadPops(path, routing.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		ok   bool
	}{
		{"the same pops, sorted by id", slices.Equal(ids(pops), ids(want)) && slices.Equal(ids(pops), []string{"pop-a", "pop-b"})},
		{"one error per skipped row", len(errs) == len(wantErrs) && len(errs) == 2},
		{"each error is a routing.RowError", !slices.ContainsFunc(errs, func(e error) bool { return !errors.As(e, new(routing.RowError)) })},
		{"deleted=0.5 is skipped with a reason, not taken for a deletion", slices.ContainsFunc(errs, func(e error) bool {
			return strings.Contains(e.Error(), `pops row "half": column deleted`)
		})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.ok {
				t.Errorf("pops %v, errors %v; routing gives %v, %v", ids(pops), errs, ids(want), wantErrs)
			}
		})
	}
}

func TestLoadPopsDatabaseErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.db")
	if _, _, err := LoadPops(missing); err == nil || !strings.Contains(err.Error(), "nope.db") {
		t.Errorf("missing file: err %v, want one naming the path", err)
	}
}
