package routing

import (
	"context"
	"database/sql"
	"fmt"
)

// The schema of routing.db, beside the reader that applies its rules
// (load.go, pops.go): a column added here is a column read there. Every
// statement is idempotent, so InitSchema on an existing database only adds
// the tables it lacks and never touches rows.
//
// The backends table keeps the contract's eleven columns: operators fill it
// with positional `INSERT INTO backends VALUES (...)`, which a twelfth
// column would break. proxy_protocol is optional (the loader reads a
// missing one as 0); `ALTER TABLE backends ADD COLUMN proxy_protocol
// INTEGER DEFAULT 0` adds it, and so does any write through edgeproxy
// (addMissingColumns).
const (
	backendsDDL = `CREATE TABLE IF NOT EXISTS backends (
    id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT,
    wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER,
    soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0
)`
	regionsDDL = `CREATE TABLE IF NOT EXISTS regions (
    country TEXT PRIMARY KEY, region TEXT NOT NULL
)`
	popsDDL = `CREATE TABLE IF NOT EXISTS pops (
    id TEXT PRIMARY KEY, region TEXT, wg_public_key TEXT NOT NULL,
    endpoint TEXT, wg_ip TEXT NOT NULL, allowed_ips TEXT NOT NULL,
    deleted INTEGER DEFAULT 0
)`
)

// SchemaDDL is the CREATE TABLE statements of routing.db (backends,
// regions, pops), in order, each idempotent.
func SchemaDDL() []string { return []string{backendsDDL, regionsDDL, popsDDL} }

// InitSchema creates the tables of routing.db that db lacks, in one
// transaction: a database is left with all of them or none added.
func InitSchema(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("create schema: %w", err)
	}
	defer tx.Rollback() // a no-op after Commit
	for _, stmt := range SchemaDDL() {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("create schema: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("create schema: %w", err)
	}
	return nil
}
