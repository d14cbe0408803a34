package failover

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// A switchover drill switches the group over to its DR site and back,
// under a probe that writes to haven_drill.probe on the primary through a
// connection string naming both sites (target_session_attrs=read-write,
// as clients should connect): the longest pause between two acknowledged
// writes is the measured RTO, and every acknowledged write must be on the
// final primary and its standby. It writes to production (the probe table,
// created on the primary and replicated like any table; its rows are
// deleted after the drill, the table stays for the next) and pauses writes
// twice: it runs only with --disruptive or in a maintenance window.

// switchoverDrillTimeout bounds each switchover of a drill, the old
// primary's rejoin (a reload from the new primary) included.
const switchoverDrillTimeout = 10 * time.Minute

// probe writes numbered rows through a multi-host connection string and
// records which were acknowledged, and the longest pause between two.
type probe struct {
	url, drill string
	next       atomic.Int64
	mu         sync.Mutex
	acked      []int64
	last       time.Time
	pause      time.Duration
}

func (p *probe) run(ctx context.Context) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for ctx.Err() == nil {
		if conn == nil {
			c, err := pgx.Connect(ctx, p.url)
			if err != nil {
				time.Sleep(20 * time.Millisecond) // the sites are switching: try again soon
				continue
			}
			conn = c
		}
		id := p.next.Add(1)
		if _, err := conn.Exec(ctx, `INSERT INTO haven_drill.probe (id, drill) VALUES ($1, $2)`, id, p.drill); err != nil {
			// Fenced, read-only or gone: find the primary again.
			conn.Close(context.Background())
			conn = nil
			continue
		}
		p.mu.Lock()
		now := time.Now()
		if !p.last.IsZero() && now.Sub(p.last) > p.pause {
			p.pause = now.Sub(p.last)
		}
		p.last = now
		p.acked = append(p.acked, id)
		p.mu.Unlock()
		// Paced: the pause is measured to within this, and the probe
		// stays a small load on production.
		select {
		case <-ctx.Done():
		case <-time.After(probeEvery):
		}
	}
}

// probeEvery paces each of the probe's two writers.
const probeEvery = 5 * time.Millisecond

// count is how many writes were acknowledged.
func (p *probe) count() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return int64(len(p.acked))
}

// takePause returns the longest pause since the last call, and starts
// measuring again.
func (p *probe) takePause() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.pause
	p.pause = 0
	return d
}

// multiHost is a connection string to whichever of two databases takes
// writes, with the first one's role, password and database.
func multiHost(first, second string) (string, error) {
	a, err := url.Parse(first)
	if err != nil || a.Host == "" {
		return "", fmt.Errorf("a switchover drill needs postgres://host:port/… URLs for both sites' databases (the agents' --source-url, the standbys' --target-url); the primary's is not one")
	}
	b, err := url.Parse(second)
	if err != nil || b.Host == "" {
		return "", fmt.Errorf("a switchover drill needs postgres://host:port/… URLs for both sites' databases (the agents' --source-url, the standbys' --target-url); DR's is not one")
	}
	a.Host += "," + b.Host
	q := a.Query()
	q.Set("target_session_attrs", "read-write")
	q.Set("connect_timeout", "2")
	q.Set("application_name", "haven_drill_probe")
	a.RawQuery = q.Encode()
	return a.String(), nil
}

func (c *Controller) switchoverDrill(ctx context.Context, r *Report) error {
	g := c.fsm.read().Groups[r.Group]
	from, to := g.PrimarySite, g.DRSite
	// The way back needs each site's other role: an agent at DR, a
	// standby at the primary's site.
	if g.AgentURLs[to] == "" || g.StandbyURLs[from] == "" {
		return fmt.Errorf("not started: the switchover back needs an agent at site %s and a standby at site %s (--controllers, --site), and one has never checked in", to, from)
	}
	primaryURL, drURL := c.route(g.PrimaryURL()), c.route(g.StandbyURLs[to])
	both, err := multiHost(primaryURL, drURL)
	if err != nil {
		return err
	}
	primary, err := pgx.Connect(ctx, primaryURL)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	defer primary.Close(context.Background())
	err = step(r, "create the probe table and see it on DR", func() (string, error) {
		if _, err := primary.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS haven_drill;
			CREATE TABLE IF NOT EXISTS haven_drill.probe (id bigint, drill text, at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (drill, id));
			COMMENT ON TABLE haven_drill.probe IS 'haven: written by switchover drills, which delete their rows after them'`); err != nil {
			return "", fmt.Errorf("create haven_drill.probe on the primary: %w", err)
		}
		if _, err := primary.Exec(ctx, `INSERT INTO haven_drill.probe (id, drill) VALUES (0, $1)`, r.ID); err != nil {
			return "", err
		}
		return "", c.seenOn(ctx, r, drURL, 0, time.Minute, "the probe table did not reach DR within a minute: a group of some tables (--tables) must list haven_drill.probe")
	})
	if err != nil {
		return err
	}
	pr := &probe{url: both, drill: r.ID}
	pctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); pr.run(pctx) }()
	}
	stopped := false
	stopProbe := func() {
		if !stopped {
			stop()
			wg.Wait()
			stopped = true
		}
	}
	defer stopProbe()
	var worst time.Duration
	for i, site := range []string{to, from} {
		name := fmt.Sprintf("switchover to site %s", site)
		if i == 1 {
			name = fmt.Sprintf("switchover back to site %s", site)
		}
		err = step(r, name, func() (string, error) {
			if err := c.waitAcked(ctx, r, pr, int64(200*(i+1))); err != nil {
				return "", err
			}
			// A site that was just reloaded by its rejoin catches up first,
			// with writes going on.
			if err := c.waitCurrent(ctx, r); err != nil {
				return "", err
			}
			pr.takePause()
			if _, err := c.propose(command{Kind: cmdSwitchover, AtMs: time.Now().UnixMilli(), Group: r.Group, Actor: "drill " + r.ID}); err != nil {
				return "", err
			}
			if err := c.waitSwitched(ctx, r, site); err != nil {
				return "", err
			}
			// Writes go on after it: the pause is over.
			if err := c.waitAcked(ctx, r, pr, pr.count()+50); err != nil {
				return "", err
			}
			pause := pr.takePause()
			worst = max(worst, pause)
			return fmt.Sprintf("longest pause between two acknowledged writes %.3fs", pause.Seconds()), nil
		})
		if err != nil {
			stopProbe()
			g := c.fsm.read().Groups[r.Group]
			return fmt.Errorf("%w; site %s is the primary now (epoch %d)%s", err, g.PrimarySite, g.Epoch, c.probeWritesLost(ctx, r.Group, pr))
		}
	}
	stopProbe()
	r.RTOSeconds = worst.Seconds()
	return step(r, "check the probe's writes on both sites", func() (string, error) {
		g := c.fsm.read().Groups[r.Group]
		final, err := pgx.Connect(ctx, c.route(g.PrimaryURL()))
		if err != nil {
			return "", fmt.Errorf("connect to the primary: %w", err)
		}
		defer final.Close(context.Background())
		last := pr.next.Add(1)
		if _, err := final.Exec(ctx, `INSERT INTO haven_drill.probe (id, drill) VALUES ($1, $2)`, last, r.ID); err != nil {
			return "", err
		}
		if err := c.seenOn(ctx, r, c.route(g.StandbyURLs[g.DRSite]), last, time.Minute, "the standby did not apply the probe's last write within a minute"); err != nil {
			return "", err
		}
		var missing []int64
		for _, u := range []string{c.route(g.PrimaryURL()), c.route(g.StandbyURLs[g.DRSite])} {
			conn, err := pgx.Connect(ctx, u)
			if err != nil {
				return "", err
			}
			err = conn.QueryRow(ctx, `SELECT coalesce(array_agg(a), '{}') FROM unnest($1::int8[]) a
				WHERE NOT EXISTS (SELECT 1 FROM haven_drill.probe p WHERE p.drill = $2 AND p.id = a)`, pr.acked, r.ID).Scan(&missing)
			conn.Close(context.Background())
			if err != nil {
				return "", fmt.Errorf("look for the probe's writes: %w", err)
			}
			if len(missing) > 0 {
				return "", fmt.Errorf("%d acknowledged writes are missing on %s, e.g. %v: WRITES WERE LOST", len(missing), u, missing[:min(len(missing), 10)])
			}
		}
		// The probe's rows go; the table stays for the next drill (dropping
		// it would be DDL on production at every drill).
		if _, err := final.Exec(ctx, `DELETE FROM haven_drill.probe WHERE drill = $1`, r.ID); err != nil {
			return "", err
		}
		r.Outcome = OutcomePassed
		r.Reason = joinReason(fmt.Sprintf("switched over to site %s and back: all %d acknowledged writes on both sites, the longest write pause %.3fs",
			to, len(pr.acked), worst.Seconds()), r.Reason)
		return fmt.Sprintf("%d acknowledged writes", len(pr.acked)), nil
	})
}

// probeWritesLost checks, after a drill that did not finish, that the
// probe's acknowledged writes are on the primary, and deletes them there.
func (c *Controller) probeWritesLost(ctx context.Context, group string, pr *probe) string {
	g := c.fsm.read().Groups[group]
	conn, err := pgx.Connect(ctx, c.route(g.PrimaryURL()))
	if err != nil {
		return "; the probe's writes could not be checked (the primary does not answer)"
	}
	defer conn.Close(context.Background())
	var missing int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM unnest($1::int8[]) a WHERE NOT EXISTS (SELECT 1 FROM haven_drill.probe p WHERE p.drill = $2 AND p.id = a)`,
		pr.acked, pr.drill).Scan(&missing); err != nil {
		return "; the probe's writes could not be checked: " + err.Error()
	}
	_, _ = conn.Exec(ctx, `DELETE FROM haven_drill.probe WHERE drill = $1`, pr.drill)
	if missing > 0 {
		return fmt.Sprintf("; %d of the probe's %d acknowledged writes are NOT on the primary", missing, len(pr.acked))
	}
	return fmt.Sprintf("; all %d of the probe's acknowledged writes are on the primary", len(pr.acked))
}

// waitCurrent waits until DR reports a lag small enough for a switchover
// to stop writes only briefly.
func (c *Controller) waitCurrent(ctx context.Context, r *Report) error {
	var lag float64
	var lacks string
	err := c.waitDrill(ctx, r, switchoverDrillTimeout, func(g *Group) (bool, error) {
		lag, lacks = g.LagSeconds, g.DRIncomplete
		return g.current(time.Now().UnixMilli()), nil
	})
	if errors.Is(err, context.DeadlineExceeded) && lacks != "" {
		return fmt.Errorf("DR's copy stayed incomplete for %s: %s", switchoverDrillTimeout, lacks)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("DR did not catch up to within %s of the primary in %s (it lags %.1fs)", switchoverMaxLag, switchoverDrillTimeout, lag)
	}
	return err
}

// waitAcked waits until the probe has n acknowledged writes.
func (c *Controller) waitAcked(ctx context.Context, r *Report, pr *probe, n int64) error {
	var got int64
	err := c.waitDrill(ctx, r, switchoverDrillTimeout, func(*Group) (bool, error) {
		got = pr.count()
		return got >= n, nil
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("the probe could write only %d rows within %s: the primary takes no writes", got, switchoverDrillTimeout)
	}
	return err
}

// waitSwitched waits until site is the group's primary and the other site
// follows it again.
func (c *Controller) waitSwitched(ctx context.Context, r *Report, site string) error {
	err := c.waitDrill(ctx, r, switchoverDrillTimeout, func(g *Group) (bool, error) {
		if g.PrimarySite == site && g.State == StateActive && g.Switchover == "" && g.RejoinSite == "" && g.AutoRejoin == "" && len(g.Deposed) == 0 {
			return true, nil
		}
		if g.PrimarySite != site && g.Switchover == "" && g.State == StateActive {
			return false, errors.New("the switchover was aborted (haven ctl status shows why in the audit); the primary stayed where it was")
		}
		return false, nil
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("site %s did not become primary with the other site following within %s", site, switchoverDrillTimeout)
	}
	return err
}

// seenOn waits until the probe's row id of a drill is on a database.
func (c *Controller) seenOn(ctx context.Context, r *Report, dbURL string, id int64, timeout time.Duration, why string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	err = c.waitDrill(ctx, r, timeout, func(*Group) (bool, error) {
		var seen bool
		err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM haven_drill.probe WHERE drill = $1 AND id = $2)`, r.ID, id).Scan(&seen)
		if err != nil && strings.Contains(err.Error(), "does not exist") {
			return false, nil // the table is not there yet
		}
		return seen, err
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return errors.New(why)
	}
	return err
}
