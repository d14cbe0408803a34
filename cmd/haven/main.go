// Command haven is the one binary of haven: capture (agent), apply
// (standby), and the tools around them. It only wires components together.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func main() {
	tuneGC()
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "haven:", err)
		os.Exit(1)
	}
}

// tuneGC trades memory for CPU: capture and apply allocate for every
// message, and with Go's default (GOGC=100) the collector took about a
// sixth of the standby's CPU while it caught up. A heap target four times
// the live heap, under a soft limit of 192 MiB, keeps both processes well
// within 256 MiB. GOGC and GOMEMLIMIT in the environment win.
func tuneGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(192 << 20)
	}
}

func newRoot() *cobra.Command {
	var logFormat, logLevel string
	root := &cobra.Command{
		Use:           "haven",
		Short:         "Change-data-capture replication and disaster recovery for PostgreSQL",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return bindEnv(cmd.Flags())
		},
	}
	root.PersistentFlags().StringVar(&logFormat, "log-format", "json", "log format: json or console")
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	logger := func() (zerolog.Logger, error) {
		level, err := zerolog.ParseLevel(logLevel)
		if err != nil {
			return zerolog.Logger{}, fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
		}
		var log zerolog.Logger
		switch logFormat {
		case "json":
			log = zerolog.New(os.Stderr)
		case "console":
			log = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly})
		default:
			return zerolog.Logger{}, fmt.Errorf("--log-format %q: use json or console", logFormat)
		}
		// Milliseconds: a failover's steps are a few hundred apart.
		zerolog.TimeFieldFormat = "2006-01-02T15:04:05.000Z07:00"
		return log.Level(level).With().Timestamp().Logger(), nil
	}
	root.AddCommand(newAgentCmd(logger), newStandbyCmd(logger), newControllerCmd(logger), newCtlCmd(), newInspectCmd(), newSkipCmd(logger))
	return root
}

// bindEnv lets every flag be set by an environment variable: --source-url is
// HAVEN_SOURCE_URL. A flag given on the command line wins.
func bindEnv(flags *pflag.FlagSet) error {
	var err error
	flags.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		name := envName(f.Name)
		if v, ok := os.LookupEnv(name); ok {
			if setErr := flags.Set(f.Name, v); setErr != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, setErr)
			}
		}
	})
	return err
}

func envName(flag string) string {
	return "HAVEN_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// signalContext ends on SIGINT or SIGTERM, for a graceful shutdown.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}
