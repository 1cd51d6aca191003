package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"

	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/spf13/cobra"
	_ "modernc.org/sqlite"
)

// sampleBackends are the demo's three echo backends on loopback.
var sampleBackends = []struct {
	id, region, country string
	port                int
}{
	{"sa-br-1", "sa", "BR", 9001},
	{"us-us-1", "us", "US", 9002},
	{"eu-fr-1", "eu", "FR", 9003},
}

func newDBCommand(e env) *cobra.Command {
	db := &cobra.Command{Use: "db", Short: "Manage the routing database"}
	var path string
	var sample bool
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create the routing database schema",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("db") {
				path = e.str("EDGEPROXY_DB_PATH", "routing.db")
			}
			existed := fileExists(path)
			added, err := initDB(path, sample)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			switch {
			case !existed:
				fmt.Fprintf(out, "created routing database %s", path)
			default:
				fmt.Fprintf(out, "routing database %s already had the schema", path)
			}
			if sample {
				fmt.Fprintf(out, "; added %d sample backends", added)
			}
			fmt.Fprintln(out)
			return nil
		},
	}
	initCmd.Flags().StringVar(&path, "db", "", "SQLite routing database (EDGEPROXY_DB_PATH, default routing.db)")
	initCmd.Flags().BoolVar(&sample, "sample", false, "add the demo's example backends on 127.0.0.1:9001-9003")
	db.AddCommand(initCmd)
	return db
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, os.ErrNotExist)
}

func initDB(path string, sample bool) (int, error) {
	db, err := sql.Open("sqlite", path)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer db.Close()
	// The schema lives beside its reader, in routing.
	if err := routing.InitSchema(context.Background(), db); err != nil {
		return 0, fmt.Errorf("routing database %s: %w", path, err)
	}
	if !sample {
		return 0, nil
	}
	added := 0
	for _, b := range sampleBackends {
		res, err := db.Exec(`INSERT OR IGNORE INTO backends
			(id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
			VALUES (?, 'demo', ?, ?, '127.0.0.1', ?, 1, 1, 100, 200, 0)`, b.id, b.region, b.country, b.port)
		if err != nil {
			return added, fmt.Errorf("add sample backend %s to %s: %w", b.id, path, err)
		}
		if n, _ := res.RowsAffected(); n > 0 {
			added++
		}
	}
	return added, nil
}
