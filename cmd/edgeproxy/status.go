package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/spf13/cobra"
)

func newStatusCommand(e env) *cobra.Command {
	var admin string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running proxy's backends, connections, bindings and data plane",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("admin") {
				admin = e.str("EDGEPROXY_ADMIN_ADDR", "127.0.0.1:9090")
			}
			if admin == "" {
				return fmt.Errorf("no admin address: the proxy's admin HTTP is disabled (EDGEPROXY_ADMIN_ADDR is empty); pass --admin ADDR")
			}
			url := "http://" + admin + "/status"
			client := &http.Client{Timeout: 3 * time.Second}
			resp, err := client.Get(url)
			if err != nil {
				return fmt.Errorf("proxy not reachable at %s (is edgeproxy running with EDGEPROXY_ADMIN_ADDR=%s?): %w", admin, admin, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return fmt.Errorf("read %s: %w", url, err)
			}
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%s answered %s", url, resp.Status)
			}
			if asJSON {
				_, err := cmd.OutOrStdout().Write(body)
				return err
			}
			var st userspace.Status
			if err := json.Unmarshal(body, &st); err != nil {
				return fmt.Errorf("decode %s: %w", url, err)
			}
			printStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().StringVar(&admin, "admin", "", "admin HTTP address of the proxy (EDGEPROXY_ADMIN_ADDR, default 127.0.0.1:9090)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the raw JSON for scripts")
	return cmd
}

func printStatus(w io.Writer, st userspace.Status) {
	fmt.Fprintf(w, "region %s, data plane %s (%s)\n", st.Region, st.Dataplane, st.DataplaneReason)
	reload := st.LastReloadResult
	if st.LastReloadError != "" {
		reload += ": " + st.LastReloadError
	}
	fmt.Fprintf(w, "routing version %s, last reload %s (%s)\n", st.RoutingVersion, st.LastReload.Format(time.RFC3339), reload)
	if e := st.Etcd; e != nil {
		state := "connected"
		if !e.Connected {
			state = "DISCONNECTED, routing on the local table"
		}
		last := "never"
		if !e.LastSync.IsZero() {
			last = e.LastSync.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "etcd %s (prefix %s): %s, revision %d applied %s\n", strings.Join(e.Endpoints, ","), e.Prefix, state, e.Revision, last)
		if e.LastError != "" && !e.Connected {
			fmt.Fprintf(w, "etcd last error: %s\n", e.LastError)
		}
	}
	fmt.Fprintf(w, "active connections %d (at most %d), affinity bindings %d\n", st.Active, st.MaxConns, st.Bindings)
	if st.Panic {
		fmt.Fprintln(w, "PANIC ROUTING: checks hold every backend down; routing to all of them")
	}
	rejected := 0
	for _, n := range st.Rejected {
		rejected += int(n)
	}
	if rejected > 0 {
		fmt.Fprintf(w, "rejected: %v\n", st.Rejected)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tREGION\tCOUNTRY\tADDRESS\tSTATE\tSINCE\tWEIGHT\tSOFT\tHARD\tPROXY\tACTIVE\tTOTAL\tERRORS\tRETRIES\tBYTES IN\tBYTES OUT")
	var lastErrors []string
	for _, b := range st.Backends {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\n", b.ID, b.Region, b.Country, b.Address,
			b.State, b.StateSince.Format(time.RFC3339), b.Weight, b.SoftLimit, b.HardLimit, proxyHeaderName(b.ProxyProtocol), b.Active, b.Total, b.ConnectErrors,
			b.ConnectRetries, b.BytesToBackend, b.BytesToClient)
		if b.LastError != "" {
			lastErrors = append(lastErrors, fmt.Sprintf("%s: %s", b.ID, b.LastError))
		}
	}
	tw.Flush()
	if len(lastErrors) > 0 {
		fmt.Fprintln(w, "\nlast check or dial error:")
		for _, e := range lastErrors {
			fmt.Fprintln(w, "  "+e)
		}
	}
}

// proxyHeaderName is the PROXY header a backend is sent, as the status
// table shows it.
func proxyHeaderName(version int) string {
	if version == 0 {
		return "-"
	}
	return fmt.Sprintf("v%d", version)
}
