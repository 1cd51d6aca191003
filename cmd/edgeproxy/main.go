// Command edgeproxy is the L4 edge proxy: `edgeproxy run` serves, the other
// subcommands set up, explain and inspect it.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	root := newRootCommand(os.LookupEnv)
	if err := root.Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "Error: %s: %v\n", commandName(root), err)
		os.Exit(1)
	}
}

func commandName(root *cobra.Command) string {
	cmd, _, err := root.Find(os.Args[1:])
	if err != nil || cmd == nil || cmd == root {
		return root.Name()
	}
	return cmd.Name()
}

func newRootCommand(lookupEnv func(string) (string, bool)) *cobra.Command {
	root := &cobra.Command{
		Use:           "edgeproxy",
		Short:         "L4 TCP edge proxy with an in-kernel sockmap data plane",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newRunCommand(env{lookupEnv}),
		newDBCommand(env{lookupEnv}),
		newStatusCommand(env{lookupEnv}),
		newRouteCommand(env{lookupEnv}),
		newGeoCommand(env{lookupEnv}),
		newWGCommand(env{lookupEnv}),
		newCtlCommand(env{lookupEnv}),
		newEchoBackendCommand(),
		newUpgradeCommand(),
		newVersionCommand(),
	)
	return root
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the edgeproxy version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "edgeproxy %s\n", version)
		},
	}
}
