package routing

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Change is one row to put into routing.db or delete from it. A put
// carries its validated row: Backend for backends, Pop for pops, Region
// for regions; a delete carries none.
type Change struct {
	Table string // TableBackends, TablePops or TableRegions
	ID    string // the row's id; for regions, its country
	// The row to put; all nil (and Region empty) for a delete.
	Backend *Backend
	Pop     *Pop
	Region  string
}

// IsDelete reports whether c removes its row.
func (c Change) IsDelete() bool { return c.Backend == nil && c.Pop == nil && c.Region == "" }

// String is the change as a log names it: "put backends/a", "delete pops/b".
func (c Change) String() string {
	if c.IsDelete() {
		return "delete " + c.Table + "/" + c.ID
	}
	return "put " + c.Table + "/" + c.ID
}

// writeTimeout bounds one write transaction, busy waits included.
const writeTimeout = 30 * time.Second

// ApplyChanges writes changes into the routing database at path in one
// transaction: a reader sees all of them or none. The file and any table
// of the schema it lacks are created first; an older table missing a
// column of the contract gets it added, so rows keep every column.
func ApplyChanges(path string, changes []Change) error {
	return writeRows(path, func(ctx context.Context, tx *sql.Tx) error {
		for _, c := range changes {
			if err := applyChange(ctx, tx, c); err != nil {
				return err
			}
		}
		return nil
	})
}

// ReplaceRows makes the routing database at path hold exactly rows, in one
// transaction: every row of the three tables that rows lacks is removed,
// unless keep (nil: none) says to keep it, and every row of rows is
// written. It returns the removed rows as deletes, in table and id order.
func ReplaceRows(path string, rows Rows, keep func(table, id string) bool) ([]Change, error) {
	var removed []Change
	err := writeRows(path, func(ctx context.Context, tx *sql.Tx) error {
		removed = removed[:0]
		want := map[string]map[string]bool{TableBackends: {}, TablePops: {}, TableRegions: {}}
		for _, b := range rows.Backends {
			want[TableBackends][b.ID] = true
		}
		for _, p := range rows.Pops {
			want[TablePops][p.ID] = true
		}
		for c := range rows.Regions {
			want[TableRegions][normalizeCountry(c)] = true
		}
		for _, table := range []string{TableBackends, TablePops, TableRegions} {
			ids, err := rowIDs(ctx, tx, table)
			if err != nil {
				return err
			}
			for _, id := range ids {
				if want[table][id] || (keep != nil && keep(table, id)) {
					continue
				}
				c := Change{Table: table, ID: id}
				if err := applyChange(ctx, tx, c); err != nil {
					return err
				}
				removed = append(removed, c)
			}
		}
		for i := range rows.Backends {
			if err := applyChange(ctx, tx, Change{Table: TableBackends, ID: rows.Backends[i].ID, Backend: &rows.Backends[i]}); err != nil {
				return err
			}
		}
		for i := range rows.Pops {
			if err := applyChange(ctx, tx, Change{Table: TablePops, ID: rows.Pops[i].ID, Pop: &rows.Pops[i]}); err != nil {
				return err
			}
		}
		for c, r := range rows.Regions {
			if err := applyChange(ctx, tx, Change{Table: TableRegions, ID: c, Region: r}); err != nil {
				return err
			}
		}
		return nil
	})
	return removed, err
}

// writeRows runs f in one write transaction on the database at path,
// after creating what the schema lacks. The transaction takes the write
// lock when it begins (_txlock=immediate), so it never fails half way for
// a reader that upgraded first; readers wait out its commit with their
// busy timeout.
func writeRows(path string, f func(context.Context, *sql.Tx) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("write routing db %s: is a directory", path)
	}
	db, err := sql.Open(sqliteDriver, "file:"+uriPathEscaper.Replace(filepath.Clean(path))+"?_pragma=busy_timeout(10000)&_txlock=immediate")
	if err != nil {
		return fmt.Errorf("write routing db %s: %w", path, err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("write routing db %s: %w", path, err)
	}
	defer tx.Rollback() // a no-op after Commit
	for _, stmt := range SchemaDDL() {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("write routing db %s: create schema: %w", path, err)
		}
	}
	for table, columns := range map[string][]string{TableBackends: backendColumns, TablePops: popColumns} {
		if err := addMissingColumns(ctx, tx, table, columns); err != nil {
			return fmt.Errorf("write routing db %s: %w", path, err)
		}
	}
	if err := f(ctx, tx); err != nil {
		return fmt.Errorf("write routing db %s: %w", path, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("write routing db %s: commit: %w", path, err)
	}
	return nil
}

// addMissingColumns brings an older table (the seed's backends without
// country, a pops table without region or endpoint) up to the contract,
// so a written row loses no column.
func addMissingColumns(ctx context.Context, tx *sql.Tx, table string, columns []string) error {
	have, err := TableColumns(ctx, tx, table)
	if err != nil {
		return fmt.Errorf("%s: %w", table, err)
	}
	for _, c := range columns {
		if _, ok := have[c]; ok {
			continue
		}
		typ := "TEXT"
		if c == "deleted" || c == "proxy_protocol" {
			typ = "INTEGER DEFAULT 0"
		}
		if _, err := tx.ExecContext(ctx, "ALTER TABLE "+quoteIdent(table)+" ADD COLUMN "+quoteIdent(c)+" "+typ); err != nil {
			return fmt.Errorf("%s: add column %s: %w", table, c, err)
		}
	}
	return nil
}

// rowIDs lists the ids (for regions, the upper-cased countries) of a
// table, deleted rows included.
func rowIDs(ctx context.Context, tx *sql.Tx, table string) ([]string, error) {
	col := "id"
	if table == TableRegions {
		col = "upper(trim(country))"
	}
	rows, err := tx.QueryContext(ctx, "SELECT DISTINCT "+col+" FROM "+quoteIdent(table))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", table, err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id sql.NullString
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("%s: %w", table, err)
		}
		ids = append(ids, id.String)
	}
	return ids, rows.Err()
}

// applyChange deletes the row, then inserts its new content for a put. A
// delete and an insert rather than an upsert: the seed's table may have no
// PRIMARY KEY for an upsert to act on.
func applyChange(ctx context.Context, tx *sql.Tx, c Change) error {
	where, key := "id = ?", c.ID
	if c.Table == TableRegions {
		where, key = "upper(trim(country)) = ?", normalizeCountry(c.ID)
	}
	switch c.Table {
	case TableBackends, TablePops, TableRegions:
	default:
		return fmt.Errorf("%s: no such table", c)
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM "+quoteIdent(c.Table)+" WHERE "+where, key); err != nil {
		return fmt.Errorf("%s: %w", c, err)
	}
	var err error
	switch {
	case c.IsDelete():
		return nil
	case c.Backend != nil:
		b := c.Backend
		_, err = tx.ExecContext(ctx, `INSERT INTO backends
			(id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted, proxy_protocol)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)`,
			b.ID, b.App, b.Region, b.Country, b.Addr.String(), int64(b.Port), b.Healthy, b.Weight, b.SoftLimit, b.HardLimit,
			b.ProxyProtocol)
	case c.Pop != nil:
		p := c.Pop
		_, err = tx.ExecContext(ctx, `INSERT INTO pops
			(id, region, wg_public_key, endpoint, wg_ip, allowed_ips, deleted)
			VALUES (?, ?, ?, ?, ?, ?, 0)`,
			p.ID, p.Region, p.PublicKey.String(), p.Endpoint, p.WGIP.String(), joinPrefixes(p.AllowedIPs))
	default:
		_, err = tx.ExecContext(ctx, `INSERT INTO regions (country, region) VALUES (?, ?)`, key, normalizeRegion(c.Region))
	}
	if err != nil {
		return fmt.Errorf("%s: %w", c, err)
	}
	return nil
}
