package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func newEchoBackendCommand() *cobra.Command {
	var listen, id, region string
	cmd := &cobra.Command{
		Use:   "echo-backend",
		Short: "Demo backend: greets with a line naming itself, then echoes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if id == "" {
				return errors.New("--id is required")
			}
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("listen on %s: %w", listen, err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			context.AfterFunc(ctx, func() { ln.Close() })
			greeting := fmt.Sprintf("hello from %s", id)
			if region != "" {
				greeting += fmt.Sprintf(" (region %s)", region)
			}
			greeting += "\n"
			fmt.Fprintf(os.Stderr, "echo-backend %s listening on %s\n", id, ln.Addr())
			for {
				c, err := ln.Accept()
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("accept on %s: %w", listen, err)
				}
				go serveEcho(c.(*net.TCPConn), greeting)
			}
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:9001", "address to listen on")
	cmd.Flags().StringVar(&id, "id", "", "backend id to greet with (required)")
	cmd.Flags().StringVar(&region, "region", "", "region to mention in the greeting")
	return cmd
}

// serveEcho greets, echoes until the client's FIN, then half-closes so the
// client still receives every echoed byte.
func serveEcho(c *net.TCPConn, greeting string) {
	defer c.Close()
	if _, err := io.WriteString(c, greeting); err != nil {
		return
	}
	// Plain buffered copy: splicing a socket into itself gains nothing.
	if _, err := io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{c}); err != nil {
		return
	}
	c.CloseWrite()
}
