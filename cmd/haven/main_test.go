package main

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestEnvironmentSetsFlagsTheCommandLineWins(t *testing.T) {
	newFlags := func() (*pflag.FlagSet, *string, *int) {
		f := pflag.NewFlagSet("test", pflag.ContinueOnError)
		url := f.String("source-url", "", "")
		replicas := f.Int("stream-replicas", 1, "")
		return f, url, replicas
	}
	t.Setenv("HAVEN_SOURCE_URL", "postgres://from-env/crm")
	t.Setenv("HAVEN_STREAM_REPLICAS", "3")

	f, url, replicas := newFlags()
	if err := f.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if err := bindEnv(f); err != nil {
		t.Fatal(err)
	}
	if *url != "postgres://from-env/crm" || *replicas != 3 {
		t.Errorf("from the environment: source-url %q, stream-replicas %d", *url, *replicas)
	}

	f, url, _ = newFlags()
	if err := f.Parse([]string{"--source-url", "postgres://from-flag/crm"}); err != nil {
		t.Fatal(err)
	}
	if err := bindEnv(f); err != nil {
		t.Fatal(err)
	}
	if *url != "postgres://from-flag/crm" {
		t.Errorf("a command-line flag must win over the environment, got %q", *url)
	}

	t.Setenv("HAVEN_STREAM_REPLICAS", "three")
	f, _, _ = newFlags()
	if err := f.Parse(nil); err != nil {
		t.Fatal(err)
	}
	err := bindEnv(f)
	if err == nil || !strings.Contains(err.Error(), "HAVEN_STREAM_REPLICAS") {
		t.Errorf("a bad value must name its variable, got %v", err)
	}
}

func TestCommandsRefuseBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"agent"}, "--source-url"},
		{[]string{"agent", "--source-url", "postgres://x/crm", "--nats-url", "nats://x"}, "--group"},
		{[]string{"agent", "--source-url", "postgres://x/crm", "--nats-url", "nats://x", "--group", "Bad.Name"}, `group "Bad.Name"`},
		{[]string{"agent", "--source-url", "postgres://x/crm", "--nats-url", "nats://x", "--group", "crm", "--stream-replicas", "2"}, "use 1, 3 or 5"},
		{[]string{"agent", "--source-url", "::not a url", "--nats-url", "nats://x", "--group", "crm"}, "--source-url"},
		{[]string{"standby", "--nats-url", "nats://x", "--group", "crm"}, "--target-url"},
		{[]string{"standby", "--target-url", "postgres://x/crm", "--nats-url", "nats://x", "--group", "crm", "--log-level", "loud"}, "--log-level"},
		{[]string{"standby", "--target-url", "postgres://x/crm", "--nats-url", "nats://x", "--group", "crm", "--snapshot-lanes", "3"}, "must be 1 or 2"},
	} {
		root := newRoot()
		root.SetArgs(tc.args)
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("haven %s: error %v, want one mentioning %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}
