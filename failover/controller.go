package failover

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/haven-dr/haven/internal/fence"
	"github.com/haven-dr/haven/proto/havenpb"
	"github.com/haven-dr/haven/proto/havenpb/havenpbconnect"
)

// Config is what a controller node needs; cmd/haven fills it from flags.
type Config struct {
	ID       string
	RaftAddr string // host:port this node's Raft transport binds and advertises
	APIAddr  string // host:port the control API listens on
	// APIURL is how other nodes and clients reach the API (default
	// http://APIAddr).
	APIURL  string
	DataDir string
	// Peers bootstraps a new cluster: every voter's ID and Raft address,
	// this node's included, the same on every node.
	Peers map[string]string
	// Join is the API URL of a running node, for a node that joins a
	// running cluster.
	Join string
	// RaftRoutes override, for this node only, where it dials a peer's
	// Raft address (by node id): a gateway or tunnel between sites.
	RaftRoutes map[string]string
	// DBRoutes override, for this node only, where it reaches a database
	// the agents registered ("host:port" to "host:port"), to probe or fence
	// it: a gateway or tunnel between sites.
	DBRoutes map[string]string
	Policy   Policy
	LeaseTTL time.Duration
	// NATSURL is where drill reports are published (haven.drills.<group>);
	// empty: they are kept in the state only.
	NATSURL string
}

// DefaultConfig returns the defaults the command line starts from.
func DefaultConfig() Config {
	return Config{
		Policy: Policy{FailoverAfter: 3 * time.Second, MaxRPO: 10 * time.Second, ProbeInterval: 500 * time.Millisecond,
			ClockMargin: 500 * time.Millisecond, StandbyTimeout: 5 * time.Second},
		LeaseTTL: 2 * time.Second,
	}
}

// Validate reports the first problem with c.
func (c Config) Validate() error {
	switch {
	case c.ID == "":
		return errors.New("no node id: set --id")
	case c.RaftAddr == "" || c.APIAddr == "":
		return errors.New("set --raft-addr and --api-addr (host:port each)")
	case c.DataDir == "":
		return errors.New("no data directory: set --data-dir")
	case len(c.Peers) == 0 && c.Join == "":
		return errors.New("set --peers id=host:port,… (every voter, this node included) to start a cluster, or --join URL to join one")
	case c.LeaseTTL <= 0 || c.Policy.FailoverAfter <= c.LeaseTTL:
		return fmt.Errorf("--lease-ttl (%s) must be positive and shorter than --failover-after (%s): the old primary must fence itself before DR is promoted", c.LeaseTTL, c.Policy.FailoverAfter)
	case c.Policy.ProbeInterval <= 0:
		return errors.New("--probe-interval must be positive")
	}
	if _, ok := c.Peers[c.ID]; len(c.Peers) > 0 && !ok {
		return fmt.Errorf("--peers does not list this node (%s)", c.ID)
	}
	return nil
}

// Controller is one node of the quorum.
type Controller struct {
	cfg   Config
	log   zerolog.Logger
	fsm   *fsm
	raft  *raft.Raft
	trans *raft.NetworkTransport
	store *raftboltdb.BoltStore

	mu      sync.Mutex
	clients map[string]havenpbconnect.ControlClient // by API URL
	probes  map[string]Observation                  // by group: this node's own view
	// Drills this node runs, by id, and how many it is starting.
	drills        map[string]context.CancelFunc
	drillStarting int
	natsMu        sync.Mutex
	nc            *nats.Conn // for drill reports, once one is published
	// membership is held by a join from its check of the joining node's
	// rules version until the node is a voter, and by the leader raising
	// the quorum's rules version: otherwise a node of the version before
	// could pass the check, the quorum move past it, and the node become a
	// voter that applies commands by rules the others no longer use.
	membership sync.Mutex
}

// Start opens the node's Raft state and joins the quorum. Run serves it.
func Start(cfg Config, log zerolog.Logger) (*Controller, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.APIURL == "" {
		cfg.APIURL = "http://" + cfg.APIAddr
	}
	log = log.With().Str("component", "controller").Str("node", cfg.ID).Logger()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create --data-dir: %w", err)
	}
	c := &Controller{cfg: cfg, log: log, fsm: newFSM(), clients: map[string]havenpbconnect.ControlClient{}, probes: map[string]Observation{},
		drills: map[string]context.CancelFunc{}}
	rc := raftConfig(cfg.ID, log)
	var err error
	if c.store, err = raftboltdb.NewBoltStore(filepath.Join(cfg.DataDir, "raft.db")); err != nil {
		return nil, fmt.Errorf("open Raft log in %s: %w", cfg.DataDir, err)
	}
	snaps, err := raft.NewFileSnapshotStore(cfg.DataDir, 3, zerologWriter{log})
	if err != nil {
		return nil, fmt.Errorf("open Raft snapshots in %s: %w", cfg.DataDir, err)
	}
	addr, err := net.ResolveTCPAddr("tcp", cfg.RaftAddr)
	if err != nil {
		return nil, fmt.Errorf("--raft-addr %q: %w", cfg.RaftAddr, err)
	}
	c.trans, err = raft.NewTCPTransportWithConfig(cfg.RaftAddr, addr, &raft.NetworkTransportConfig{
		MaxPool: 3, Timeout: 2 * time.Second, Logger: rc.Logger, ServerAddressProvider: routesOf(cfg)})
	if err != nil {
		return nil, fmt.Errorf("listen for Raft on %s: %w", cfg.RaftAddr, err)
	}
	existing, err := raft.HasExistingState(c.store, c.store, snaps)
	if err != nil {
		return nil, fmt.Errorf("read Raft state: %w", err)
	}
	if c.raft, err = raft.NewRaft(rc, c.fsm, c.store, c.store, snaps, c.trans); err != nil {
		return nil, fmt.Errorf("start Raft: %w", err)
	}
	if !existing && len(cfg.Peers) > 0 {
		var servers []raft.Server
		for id, a := range cfg.Peers {
			servers = append(servers, raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(a), Suffrage: raft.Voter})
		}
		if err := c.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return nil, fmt.Errorf("bootstrap the cluster: %w", err)
		}
	}
	return c, nil
}

// raftConfig is a node's Raft settings.
func raftConfig(id string, log zerolog.Logger) *raft.Config {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(id)
	// Elections in about a second: detection takes FailoverAfter anyway.
	rc.HeartbeatTimeout = 500 * time.Millisecond
	rc.ElectionTimeout = 500 * time.Millisecond
	rc.LeaderLeaseTimeout = 250 * time.Millisecond
	rc.CommitTimeout = 20 * time.Millisecond
	rc.SnapshotThreshold = 4096
	rc.Logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: zerologWriter{log}})
	return rc
}

// routes maps peer ids to the address this node dials them at.
type routes map[string]string

// routesOf returns where this node dials its peers: --raft-route, else the
// bootstrap peers' addresses; nil (the addresses in the Raft configuration)
// without routes.
func routesOf(cfg Config) raft.ServerAddressProvider {
	if len(cfg.RaftRoutes) == 0 {
		return nil
	}
	r := routes{}
	for id, a := range cfg.Peers {
		r[id] = a
	}
	for id, a := range cfg.RaftRoutes {
		r[id] = a
	}
	return r
}

func (r routes) ServerAddr(id raft.ServerID) (raft.ServerAddress, error) {
	if a, ok := r[string(id)]; ok {
		return raft.ServerAddress(a), nil
	}
	// raft dials the address in the configuration.
	return "", fmt.Errorf("no route for %s", id)
}

// zerologWriter carries Raft's own log lines into the node's log.
type zerologWriter struct{ log zerolog.Logger }

func (w zerologWriter) Write(p []byte) (int, error) {
	w.log.Warn().Str("from", "raft").Msg(string(trimNewline(p)))
	return len(p), nil
}

func trimNewline(p []byte) []byte {
	for len(p) > 0 && (p[len(p)-1] == '\n' || p[len(p)-1] == '\r') {
		p = p[:len(p)-1]
	}
	return p
}

// Run serves the control API and runs the node's loops until ctx ends, or
// until the node finds it cannot apply the quorum's rules (fsm.behind).
func (c *Controller) Run(ctx context.Context) error {
	defer c.shutdown()
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	ln, err := net.Listen("tcp", c.cfg.APIAddr)
	if err != nil {
		return fmt.Errorf("listen for the control API on %s: %w", c.cfg.APIAddr, err)
	}
	mux := http.NewServeMux()
	path, handler := havenpbconnect.NewControlHandler(&api{c: c})
	mux.Handle(path, handler)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); c.probeLoop(ctx, stop) }()
	go func() { defer wg.Done(); c.leaderLoop(ctx) }()
	go func() { defer wg.Done(); c.drillLoop(ctx) }()
	c.log.Info().Str("api", c.cfg.APIURL).Str("raft", c.cfg.RaftAddr).Msg("controller node running")
	err = srv.Serve(ln)
	wg.Wait()
	if behind := c.fsm.stopped(); behind != nil {
		return behind
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (c *Controller) shutdown() {
	c.stopDrills()
	c.natsMu.Lock()
	if c.nc != nil {
		c.nc.Close()
	}
	c.natsMu.Unlock()
	if err := c.raft.Shutdown().Error(); err != nil {
		c.log.Warn().Err(err).Msg("Raft shutdown")
	}
	_ = c.trans.Close()
	_ = c.store.Close()
}

// propose applies a command through the quorum (on the leader) and returns
// the state machine's answer.
func (c *Controller) propose(cmd command) (any, error) {
	if behind := c.fsm.stopped(); behind != nil {
		// Its state stopped at the rules change: what it would decide
		// from it (as leader, until the node stops) is stale.
		return nil, behind
	}
	data, err := json.Marshal(cmd)
	if err != nil {
		return nil, err
	}
	f := c.raft.Apply(data, 5*time.Second)
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("commit %s through the quorum: %w", cmd.Kind, err)
	}
	if err, ok := f.Response().(error); ok {
		return nil, err
	}
	return f.Response(), nil
}

func (c *Controller) isLeader() bool { return c.raft.State() == raft.Leader }

// leaderClient returns a client of the leader's API, or why there is none.
func (c *Controller) leaderClient() (havenpbconnect.ControlClient, error) {
	_, id := c.raft.LeaderWithID()
	if id == "" {
		return nil, errors.New("no leader: the quorum has no majority (are more than half of the controller nodes up and connected?)")
	}
	info, ok := c.fsm.read().Nodes[string(id)]
	if !ok || info.APIURL == "" {
		return nil, fmt.Errorf("leader %s has not published its API address yet; retry", id)
	}
	return c.client(info.APIURL), nil
}

func (c *Controller) client(url string) havenpbconnect.ControlClient {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.clients[url]; ok {
		return cl
	}
	cl := havenpbconnect.NewControlClient(&http.Client{Timeout: 10 * time.Second}, url)
	c.clients[url] = cl
	return cl
}

// leaderless says, now and then, that this node has had no leader for a
// while: Raft's own log says only that it keeps starting elections.
type leaderless struct{ since, said time.Time }

const leaderlessAlarm = 10 * time.Second

func (l *leaderless) check(c *Controller) {
	if _, id := c.raft.LeaderWithID(); id != "" {
		l.since = time.Time{}
		return
	}
	now := time.Now()
	if l.since.IsZero() {
		l.since = now
	}
	if d := now.Sub(l.since); d >= leaderlessAlarm && now.Sub(l.said) >= 3*leaderlessAlarm {
		l.said = now
		c.log.Error().Dur("for", d.Round(time.Second)).Msg("no leader: more than half of the quorum's nodes are down or cut off from this one, " +
			"or this node was removed from the quorum (haven ctl status, asked of another node, lists the members; a removed node's host rejoins with an empty --data-dir and --join)")
	}
}

// probeLoop probes every group's primary and hands the result to the
// leader; it also makes sure the leader knows this node's API address. It
// stops the node (stop) once it cannot apply the quorum's rules.
func (c *Controller) probeLoop(ctx context.Context, stop context.CancelFunc) {
	ticker := time.NewTicker(c.cfg.Policy.ProbeInterval)
	defer ticker.Stop()
	var versionSaid time.Time
	var quiet leaderless
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if behind := c.fsm.stopped(); behind != nil {
			c.log.Error().Err(behind).Msg("this controller node stops")
			stop()
			return
		}
		quiet.check(c)
		st := c.fsm.read()
		switch info, ok := st.Nodes[c.cfg.ID]; {
		case !ok || info.APIURL != c.cfg.APIURL:
			c.announce(ctx)
		case (info.RulesVersion != RulesVersion || st.RulesVersion < RulesVersion) && time.Since(versionSaid) >= time.Minute:
			// Until the quorum runs this version, say it again now and
			// then (not at every probe): a leader older than rules
			// versions records none, and one whose state came from such a
			// leader's snapshot may lack what this node said.
			versionSaid = time.Now()
			c.announce(ctx)
		}
		var wg sync.WaitGroup
		for _, g := range st.Groups {
			url := c.route(g.PrimaryURL())
			if url == "" {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.probe(ctx, g.Name, url)
			}()
		}
		wg.Wait()
	}
}

// route rewrites a database URL's host:port by DBRoutes.
func (c *Controller) route(dbURL string) string {
	u, err := url.Parse(dbURL)
	if err != nil || u.Host == "" {
		return dbURL
	}
	if to, ok := c.cfg.DBRoutes[u.Host]; ok {
		u.Host = to
		return u.String()
	}
	return dbURL
}

// probe checks that a primary answers SQL within the probe interval.
func (c *Controller) probe(ctx context.Context, group, url string) {
	timeout := max(c.cfg.Policy.ProbeInterval*2, time.Second)
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := probeSQL(pctx, url)
	if ctx.Err() != nil {
		return
	}
	now := time.Now().UnixMilli()
	o := Observation{Up: err == nil, AtMs: now, SinceMs: now}
	if err != nil {
		o.Error = err.Error()
	}
	c.mu.Lock()
	if prev, ok := c.probes[group]; ok && prev.Up == o.Up {
		o.SinceMs = prev.SinceMs
	}
	c.probes[group] = o
	c.mu.Unlock()
	if !o.Up {
		c.log.Debug().Str("group", group).Str("error", o.Error).Msg("primary probe failed")
	}
	req := &havenpb.ObserveRequest{NodeId: c.cfg.ID, Group: group, Up: o.Up, AtUnixMs: o.AtMs, Error: o.Error}
	if _, err := (&api{c: c}).observe(ctx, req); err != nil && ctx.Err() == nil {
		c.log.Debug().Err(err).Msg("could not hand a probe to the leader")
	}
}

func probeSQL(ctx context.Context, url string) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.RuntimeParams["application_name"] = "haven_controller_probe"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

// raiseRulesVersion moves the quorum to the rules version every voter
// runs, unless a join is being decided (it is tried again at the next
// tick: the leader's loop does not wait for a join).
func (c *Controller) raiseRulesVersion(at time.Time) {
	if !c.membership.TryLock() {
		return
	}
	defer c.membership.Unlock()
	st := c.fsm.read()
	if v := quorumRulesVersion(st.Nodes, c.voterIDs()); v > st.RulesVersion && v > 1 {
		if _, err := c.propose(command{Kind: cmdRulesVersion, AtMs: at.UnixMilli(), Actor: "controller@" + c.cfg.ID, RulesVersion: v}); err != nil {
			c.log.Warn().Err(err).Int("version", v).Msg("raise the quorum's rules version")
		}
	}
}

// announce records this node's API address and rules version in the state.
func (c *Controller) announce(ctx context.Context) {
	if c.isLeader() {
		if _, err := c.propose(command{Kind: cmdNode, AtMs: time.Now().UnixMilli(), Node: c.cfg.ID, Info: &NodeInfo{APIURL: c.cfg.APIURL, RulesVersion: RulesVersion}}); err != nil {
			c.log.Warn().Err(err).Msg("record this node's API address")
		}
		return
	}
	cl, err := c.leaderClient()
	if err != nil {
		if c.cfg.Join == "" {
			return
		}
		// Not in a quorum yet: ask the node we were told to join.
		cl = c.client(c.cfg.Join)
	}
	if _, err := cl.Join(ctx, connectRequest(&havenpb.JoinRequest{NodeId: c.cfg.ID, RaftAddress: c.cfg.RaftAddr, ApiUrl: c.cfg.APIURL, RulesVersion: RulesVersion})); err != nil {
		c.log.Debug().Err(err).Msg("announce this node to the leader")
	}
}

// A switchover that does not get on is aborted: DR that does not catch up
// by catchUpTimeout, or a primary's agent that does not drain within
// switchoverTimeout of the fence (it died, its capture failed), which gets
// its primary back.
const (
	catchUpTimeout    = time.Minute
	switchoverTimeout = 15 * time.Second
)

// leaderLoop decides, on the leader, which groups fail over.
func (c *Controller) leaderLoop(ctx context.Context) {
	ticker := time.NewTicker(c.cfg.Policy.ProbeInterval / 2)
	defer ticker.Stop()
	var lastFenceCheck time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if !c.isLeader() {
			continue
		}
		now := time.Now()
		c.raiseRulesVersion(now)
		st := c.fsm.read()
		voters := c.voterIDs()
		if now.Sub(lastFenceCheck) >= c.cfg.Policy.ProbeInterval {
			lastFenceCheck = now
			c.fenceDeposed(ctx, st)
		}
		for _, g := range st.Groups {
			if reason := switchoverStuck(g, now); reason != "" {
				c.log.Error().Str("group", g.Name).Msg("switchover aborted: " + reason)
				_, _ = c.propose(command{Kind: cmdAbortSwitchover, AtMs: now.UnixMilli(), Group: g.Name, Actor: "controller@" + c.cfg.ID, Reason: reason})
				continue
			}
			d := Decide(g, voters, now, c.cfg.Policy)
			if d.Failover {
				reason := fmt.Sprintf("primary down for %s on a majority of %d controller nodes, DR lag %.2fs", c.cfg.Policy.FailoverAfter, len(voters), g.LagSeconds)
				c.log.Warn().Str("group", g.Name).Str("reason", reason).Msg("failing over: promoting the DR site")
				if _, err := c.propose(command{Kind: cmdFailover, AtMs: now.UnixMilli(), Group: g.Name, Epoch: g.Epoch,
					Actor: "controller@" + c.cfg.ID, Reason: reason}); err != nil {
					c.log.Error().Err(err).Str("group", g.Name).Msg("failover not committed")
				}
				continue
			}
			if d.Alert != g.Alert {
				if d.Alert != "" {
					c.log.Error().Str("group", g.Name).Msg(d.Alert)
				}
				_, _ = c.propose(command{Kind: cmdAlert, AtMs: now.UnixMilli(), Group: g.Name, Reason: d.Alert})
			}
		}
	}
}

// switchoverStuck says why a group's switchover must be aborted, if it must.
func switchoverStuck(g *Group, now time.Time) string {
	took := now.Sub(time.UnixMilli(g.SwitchoverStarted))
	switch {
	case g.Switchover == phaseCatchUp && took > catchUpTimeout && g.DRIncomplete != "":
		return fmt.Sprintf("DR's copy stayed incomplete for %s (%s); writes were never stopped", catchUpTimeout, g.DRIncomplete)
	case g.Switchover == phaseCatchUp && took > catchUpTimeout:
		return fmt.Sprintf("DR did not catch up to within %s of the primary in %s (it lags %.1fs); writes were never stopped", switchoverMaxLag, catchUpTimeout, g.LagSeconds)
	case g.Switchover == phaseFence && took > switchoverTimeout:
		return fmt.Sprintf("the primary's agent did not drain within %s; the primary is unfenced and stays primary", switchoverTimeout)
	}
	return ""
}

// fenceDeposed fences every reachable database of a deposed primary that
// is not fenced: an old primary that comes back, with or without its agent,
// must not take writes while another site is primary.
func (c *Controller) fenceDeposed(ctx context.Context, st *State) {
	var wg sync.WaitGroup
	for _, g := range st.Groups {
		for site, url := range g.DeposedURLs() {
			url := c.route(url)
			wg.Add(1)
			go func() {
				defer wg.Done()
				fctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				defer cancel()
				fenced, err := fence.IsFenced(fctx, url)
				if err != nil || fenced {
					return // down (nothing takes writes there), or fenced
				}
				if err := fence.Fence(fctx, url); err != nil {
					c.log.Error().Err(err).Str("group", g.Name).Str("site", site).Msg("the deposed primary is reachable and NOT fenced, and fencing it failed: stop it by hand")
					return
				}
				c.log.Warn().Str("group", g.Name).Str("site", site).Uint64("epoch", g.Epoch).Msg("fenced the deposed primary, reachable again")
			}()
		}
	}
	wg.Wait()
}

// voterIDs are the quorum's voting nodes (none if its configuration cannot
// be read).
func (c *Controller) voterIDs() []string {
	f := c.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var ids []string
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			ids = append(ids, string(s.ID))
		}
	}
	return ids
}
