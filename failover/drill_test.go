package failover

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// drillGroup is a state with group crm: primary a, DR b.
func drillGroup(t *testing.T) *fsm {
	t.Helper()
	f := newFSM()
	apply(t, f, 1, command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "a", Agent: true, Epoch: 1, GrantLease: true, LeaseTTLMs: 2000})
	apply(t, f, 2, command{Kind: cmdCheckIn, AtMs: 1000, Group: "crm", Site: "b", AppliedLSN: 100})
	return f
}

// TestFSMDrillOrdersTheStandby: a verify drill orders the DR standby to
// hold, then to stop at the cut, records where it holds, and lets it go
// once the drill compares; its report replaces the running one.
func TestFSMDrillOrdersTheStandby(t *testing.T) {
	f := drillGroup(t)
	r := apply(t, f, 3, command{Kind: cmdDrillStart, AtMs: 2000, Group: "crm", Node: "c1", Drill: &drillCommand{Kind: DrillVerify, Trigger: "test"}}).(Report)
	if r.Outcome != OutcomeRunning {
		t.Fatalf("start: %+v", r)
	}
	ci := func(at int64, c command) checkInResult {
		c.Kind, c.AtMs, c.Group, c.Site = cmdCheckIn, at, "crm", "b"
		return apply(t, f, 4, c).(checkInResult)
	}
	if got := ci(2050, command{}); got.DrillHold != "" {
		t.Fatalf("standby before the drill asks it to hold: %+v", got)
	}
	apply(t, f, 4, command{Kind: cmdDrillPhase, AtMs: 2080, Group: "crm", Drill: &drillCommand{ID: r.ID, Phase: drillHold}})
	if got := ci(2100, command{}); got.DrillHold != r.ID || got.DrillCutLSN != 0 || !got.Apply {
		t.Fatalf("standby during hold: %+v", got)
	}
	ci(2200, command{DrillID: r.ID, HeldLSN: 90})
	if d := f.read().Groups["crm"].Drill; d.HeldMs != 2200 || d.HeldLSN != 90 || d.AtCut {
		t.Fatalf("drill after the standby held: %+v", d)
	}
	// Where the standby says it stopped at a cut it was not given, it is not.
	ci(2250, command{DrillID: r.ID, HeldLSN: 90, AtCut: true})
	if f.read().Groups["crm"].Drill.AtCut {
		t.Fatal("at the cut before there was one")
	}
	apply(t, f, 5, command{Kind: cmdDrillPhase, AtMs: 2300, Group: "crm", Drill: &drillCommand{ID: r.ID, Phase: drillCut, CutLSN: 120}})
	if got := ci(2400, command{DrillID: r.ID, HeldLSN: 90}); got.DrillHold != r.ID || got.DrillCutLSN != 120 {
		t.Fatalf("standby during the cut: %+v", got)
	}
	ci(2500, command{DrillID: r.ID, HeldLSN: 119, AtCut: true})
	if d := f.read().Groups["crm"].Drill; !d.AtCut || d.HeldMs != 2200 {
		t.Fatalf("drill at the cut: %+v", d)
	}
	apply(t, f, 6, command{Kind: cmdDrillPhase, AtMs: 2600, Group: "crm", Drill: &drillCommand{ID: r.ID, Phase: drillCompare}})
	if got := ci(2700, command{}); got.DrillHold != "" {
		t.Fatalf("standby while the drill compares: %+v, want no hold", got)
	}
	final := r
	final.Outcome, final.EndedMs = OutcomePassed, 3000
	apply(t, f, 7, command{Kind: cmdDrillFinish, AtMs: 3000, Group: "crm", Drill: &drillCommand{Report: &final}})
	st := f.read()
	if st.Groups["crm"].Drill != nil || st.report(r.ID).Outcome != OutcomePassed || st.Groups["crm"].DrillPassedMs[DrillVerify] != 3000 {
		t.Fatalf("after the drill: %+v %+v", st.Groups["crm"], st.report(r.ID))
	}
}

// TestFSMDrillBusyAndInterrupted: a drill does not start while another
// runs (a scheduled one is recorded as skipped, with an alert), and a
// failover ends the drill under way as interrupted.
func TestFSMDrillBusyAndInterrupted(t *testing.T) {
	f := drillGroup(t)
	first := apply(t, f, 3, command{Kind: cmdDrillStart, AtMs: 2000, Group: "crm", Node: "c1", Drill: &drillCommand{Kind: DrillVerify}}).(Report)
	second := apply(t, f, 4, command{Kind: cmdDrillStart, AtMs: 2100, Group: "crm", Node: "c1", Drill: &drillCommand{Kind: DrillVerify}}).(Report)
	if second.Outcome != OutcomeSkipped || !strings.Contains(second.Reason, first.ID) {
		t.Fatalf("second drill: %+v", second)
	}
	if a := f.read().Groups["crm"].DrillAlert; !strings.Contains(a, "skipped") {
		t.Fatalf("alert %q", a)
	}
	apply(t, f, 5, command{Kind: cmdFailover, AtMs: 2200, Group: "crm", Epoch: 1, Actor: "op"})
	st := f.read()
	if st.Groups["crm"].Drill != nil || st.report(first.ID).Outcome != OutcomeInterrupted {
		t.Fatalf("after a failover: %+v %+v", st.Groups["crm"].Drill, st.report(first.ID))
	}
	// A late report of the interrupted drill does not overwrite it.
	late := first
	late.Outcome = OutcomePassed
	apply(t, f, 6, command{Kind: cmdDrillFinish, AtMs: 2300, Group: "crm", Drill: &drillCommand{Report: &late}})
	if got := f.read().report(first.ID).Outcome; got != OutcomeInterrupted {
		t.Fatalf("late report recorded: %s", got)
	}
}

// TestFSMScheduleFiresEachSlotOnce: a slot fires once, whoever proposes it
// again (a new leader that did not see the first), and a leaderless stretch
// runs its latest slot, counting those missed.
func TestFSMScheduleFiresEachSlotOnce(t *testing.T) {
	f := drillGroup(t)
	created := time.Date(2026, 11, 30, 2, 59, 30, 0, time.UTC)
	sc := apply(t, f, 3, command{Kind: cmdSchedule, AtMs: created.UnixMilli(), Group: "crm", Drill: &drillCommand{Schedule: &Schedule{Kind: DrillVerify, Cron: "0 3 * * *"}}}).(Schedule)
	s := f.read().Schedules[sc.ID]
	if _, _, ok := s.dueSlot(created.Add(20 * time.Second)); ok {
		t.Fatal("a slot is due before the first one")
	}
	slot, missed, ok := s.dueSlot(created.Add(time.Minute))
	if !ok || missed != 0 || !slot.Equal(time.Date(2026, 11, 30, 3, 0, 0, 0, time.UTC)) {
		t.Fatalf("due: %s %d %v", slot, missed, ok)
	}
	start := command{Kind: cmdDrillStart, AtMs: slot.UnixMilli(), Group: "crm", Node: "c1", Drill: &drillCommand{Kind: DrillVerify, Schedule: &Schedule{ID: sc.ID}, SlotMs: slot.UnixMilli()}}
	if r, ok := apply(t, f, 4, start).(Report); !ok || r.Outcome != OutcomeRunning {
		t.Fatalf("first firing: %+v", r)
	}
	if err, _ := apply(t, f, 5, start).(error); !errors.Is(err, errSlotFired) {
		t.Fatalf("second firing of the same slot: %v", err)
	}
	s = f.read().Schedules[sc.ID]
	slot, missed, ok = s.dueSlot(time.Date(2026, 12, 3, 4, 0, 0, 0, time.UTC))
	if !ok || missed != 2 || !slot.Equal(time.Date(2026, 12, 3, 3, 0, 0, 0, time.UTC)) {
		t.Fatalf("after three days without a leader: %s %d %v", slot, missed, ok)
	}
}

// TestFSMPromoteDrillRehearses: a promote drill orders the DR standby to
// rehearse (not to hold), and records the steps it reports until done.
func TestFSMPromoteDrillRehearses(t *testing.T) {
	f := drillGroup(t)
	r := apply(t, f, 3, command{Kind: cmdDrillStart, AtMs: 2000, Group: "crm", Node: "c1", Drill: &drillCommand{Kind: DrillPromote}}).(Report)
	ci := func(c command) checkInResult {
		c.Kind, c.AtMs, c.Group, c.Site = cmdCheckIn, 2100, "crm", "b"
		return apply(t, f, 4, c).(checkInResult)
	}
	if got := ci(command{}); got.DrillRehearse != r.ID || got.DrillHold != "" || !got.Apply {
		t.Fatalf("standby during a promote drill: %+v", got)
	}
	ci(command{DrillID: r.ID, DrillSteps: []Step{{Name: "clone the DR cluster", Seconds: 1.5}}})
	if d := f.read().Groups["crm"].Drill; len(d.Steps) != 1 || d.Done || d.HeldMs != 0 {
		t.Fatalf("drill while the standby rehearses: %+v", d)
	}
	ci(command{DrillID: r.ID, DrillSteps: []Step{{Name: "clone the DR cluster", Seconds: 1.5}, {Name: "start the clone", Seconds: 0.1}}, DrillDone: true})
	if d := f.read().Groups["crm"].Drill; len(d.Steps) != 2 || !d.Done || d.Error != "" {
		t.Fatalf("drill once rehearsed: %+v", d)
	}
}

// TestOverdueDrillsAlert: a scheduled kind of drill that has not passed
// within two intervals alerts, counted from the last pass or from the
// schedule's creation; a pass in time, a drill under way, or an alert
// already raised keep it quiet.
func TestOverdueDrillsAlert(t *testing.T) {
	created := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	sc := &Schedule{ID: "s1", Group: "crm", Kind: DrillVerify, Cron: "0 3 * * *", CreatedMs: created.UnixMilli()}
	g := &Group{Name: "crm"}
	if why := overdue(sc, g, created.Add(47*time.Hour)); why != "" {
		t.Errorf("within two days of the schedule: %q", why)
	}
	if why := overdue(sc, g, created.Add(50*time.Hour)); !strings.Contains(why, "no verify drill of group crm has passed since 2026-11-01T00:00:00Z") {
		t.Errorf("no pass in 50 h: %q", why)
	}
	g.DrillPassedMs = map[string]int64{DrillVerify: created.Add(40 * time.Hour).UnixMilli()}
	if why := overdue(sc, g, created.Add(50*time.Hour)); why != "" {
		t.Errorf("passed 10 h before: %q", why)
	}
	if why := overdue(sc, g, created.Add(100*time.Hour)); why == "" {
		t.Error("passed 60 h before: no alert")
	}
	g.Drill = &ActiveDrill{ID: "d9"}
	if why := overdue(sc, g, created.Add(100*time.Hour)); why != "" {
		t.Errorf("a drill under way: %q", why)
	}
}

// TestDrillFailsOnAnIncompleteDR: a drill that passed otherwise fails when
// DR's copy was incomplete at its start, and says what it lacked.
func TestDrillFailsOnAnIncompleteDR(t *testing.T) {
	r := Report{Outcome: OutcomePassed, RPO: RPO{Incomplete: "the initial snapshot at 0/16B3748 is only partly loaded"}}
	r.judge()
	if r.Outcome != OutcomeFailed || !strings.Contains(r.Reason, "only partly loaded") {
		t.Errorf("drill with an incomplete DR: %s (%q), want failed, saying what DR lacked", r.Outcome, r.Reason)
	}
	r = Report{Outcome: OutcomePassed}
	if r.judge(); r.Outcome != OutcomePassed {
		t.Errorf("drill with a complete DR: %s (%q), want passed", r.Outcome, r.Reason)
	}
}
