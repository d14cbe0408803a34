package agent

import "github.com/prometheus/client_golang/prometheus"

// metrics are the agent's Prometheus series, registered on the registry
// passed to New.
type metrics struct {
	transactions  prometheus.Counter
	changes       prometheus.Counter
	chunks        prometheus.Counter
	snapshotRows  prometheus.Counter
	receivedLSN   prometheus.Gauge
	confirmedLSN  prometheus.Gauge
	retainedWAL   prometheus.Gauge
	lagBytes      prometheus.Gauge
	lagSeconds    prometheus.Gauge
	connected     prometheus.Gauge
	errors        *prometheus.CounterVec
	unreplicated  prometheus.Gauge
	backfillRows  prometheus.Counter
	backfilling   prometheus.Gauge
	backfillsHeld prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, group string) *metrics {
	labels := prometheus.Labels{"group": group}
	m := &metrics{
		transactions:  prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_agent_captured_transactions_total", Help: "Source transactions published and acknowledged by JetStream.", ConstLabels: labels}),
		changes:       prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_agent_captured_changes_total", Help: "Row changes (insert, update, delete, truncate) published and acknowledged.", ConstLabels: labels}),
		chunks:        prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_agent_published_chunks_total", Help: "Chunks acknowledged by JetStream.", ConstLabels: labels}),
		snapshotRows:  prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_agent_snapshot_rows_total", Help: "Rows copied by initial snapshots.", ConstLabels: labels}),
		receivedLSN:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_received_lsn", Help: "Highest WAL position received from the walsender.", ConstLabels: labels}),
		confirmedLSN:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_confirmed_lsn", Help: "WAL position confirmed to PostgreSQL: everything before it is acknowledged by JetStream.", ConstLabels: labels}),
		retainedWAL:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_slot_retained_wal_bytes", Help: "WAL the slot keeps on the primary (current WAL position minus the slot's restart_lsn).", ConstLabels: labels}),
		lagBytes:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_lag_bytes", Help: "Current WAL position minus the slot's confirmed position.", ConstLabels: labels}),
		lagSeconds:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_lag_seconds", Help: "Time between a transaction's commit on the primary and JetStream's acknowledgement of it (last transaction).", ConstLabels: labels}),
		connected:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_streaming", Help: "1 while the agent streams from its slot.", ConstLabels: labels}),
		errors:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "haven_agent_errors_total", Help: "Errors that restarted the capture session, by kind.", ConstLabels: labels}, []string{"kind"}),
		unreplicated:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_unreplicated_tables", Help: "Tables the configuration selects that the group's publication does not cover.", ConstLabels: labels}),
		backfillRows:  prometheus.NewCounter(prometheus.CounterOpts{Name: "haven_agent_backfill_rows_total", Help: "Rows copied by backfills of tables that joined the group with rows, published and acknowledged.", ConstLabels: labels}),
		backfilling:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_backfilling_tables", Help: "Tables whose backfill is not finished.", ConstLabels: labels}),
		backfillsHeld: prometheus.NewGauge(prometheus.GaugeOpts{Name: "haven_agent_backfills_held_tables", Help: "Tables whose backfill waits for the agent's role to be allowed to read every row (SELECT, row-level security): the log says what to grant.", ConstLabels: labels}),
	}
	reg.MustRegister(m.transactions, m.changes, m.chunks, m.snapshotRows, m.receivedLSN, m.confirmedLSN,
		m.retainedWAL, m.lagBytes, m.lagSeconds, m.connected, m.errors, m.unreplicated, m.backfillRows, m.backfilling, m.backfillsHeld)
	return m
}
