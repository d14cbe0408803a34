package replicator

import "github.com/prometheus/client_golang/prometheus"

// metrics are the standby's Prometheus series, registered on the registry
// passed to New.
type metrics struct {
	transactions prometheus.Counter
	changes      prometheus.Counter
	groups       prometheus.Counter
	snapshotRows prometheus.Counter
	duplicates   prometheus.Counter
	conflicts    *prometheus.CounterVec
	appliedLSN   prometheus.Gauge
	lagSeconds   prometheus.Gauge
	pending      prometheus.Gauge
	blocked      prometheus.Gauge
	connected    prometheus.Gauge
	errors       prometheus.Counter

	ddlApplied     prometheus.Counter
	ddlFailures    prometheus.Counter
	ddlNotReplayed prometheus.Counter

	unreplicatedTables prometheus.Counter
	backfilling        prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, group string) *metrics {
	labels := prometheus.Labels{"group": group}
	m := &metrics{
		transactions: prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_applied_transactions_total", Help: "Source transactions committed on DR.", ConstLabels: labels}),
		changes:      prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_applied_changes_total", Help: "Row changes committed on DR.", ConstLabels: labels}),
		groups:       prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_target_transactions_total", Help: "Target transactions committed on DR (each groups one or more source transactions).", ConstLabels: labels}),
		snapshotRows: prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_snapshot_rows_total", Help: "Rows loaded from initial snapshots.", ConstLabels: labels}),
		duplicates:   prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_skipped_duplicates_total", Help: "Chunks skipped because their transaction was already applied.", ConstLabels: labels}),
		conflicts:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "haven_standby_missing_rows_total", Help: "Rows of changes from the primary that DR did not apply (the DR copy drifted): updates and deletes that found no row, inserted rows a DR rule or trigger dropped.", ConstLabels: labels}, []string{"table"}),
		appliedLSN:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_applied_lsn", Help: "Source commit LSN of the last transaction committed on DR.", ConstLabels: labels}),
		lagSeconds:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_lag_seconds", Help: "Age of the last applied source commit while messages are pending; 0 when DR has applied the whole stream.", ConstLabels: labels}),
		pending:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_pending_messages", Help: "Stream messages not yet delivered to the standby.", ConstLabels: labels}),
		blocked:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_blocked", Help: "1 while apply is stopped at a message it cannot apply (see the log for which and why).", ConstLabels: labels}),
		connected:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_applying", Help: "1 while the standby is connected and applying.", ConstLabels: labels}),
		errors:       prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_errors_total", Help: "Errors that restarted the apply session.", ConstLabels: labels}),
	}
	m.ddlApplied = prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_ddl_replayed_total", Help: "DDL statements replayed on DR.", ConstLabels: labels})
	m.ddlFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_ddl_failures_total", Help: "DDL replays that failed on DR and stopped apply (see the log).", ConstLabels: labels})
	m.ddlNotReplayed = prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_ddl_not_replayed_total", Help: "DDL that ran inside statements haven does not replay; make the change on DR by hand.", ConstLabels: labels})
	m.unreplicatedTables = prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_standby_unreplicated_tables_total", Help: "Tables created on the primary that it could not add to the group (no key); see the log.", ConstLabels: labels})
	m.backfilling = prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_standby_backfilling_tables", Help: "DR tables whose rows are still being backfilled from the primary.", ConstLabels: labels})
	reg.MustRegister(m.ddlApplied, m.ddlFailures, m.ddlNotReplayed, m.unreplicatedTables, m.backfilling)
	reg.MustRegister(m.transactions, m.changes, m.groups, m.snapshotRows, m.duplicates, m.conflicts, m.appliedLSN,
		m.lagSeconds, m.pending, m.blocked, m.connected, m.errors)
	return m
}
