// Package e2e tests haven as a user runs it: the real haven binary, real
// PostgreSQL clusters started by internal/pgtest, and a real NATS server
// embedded by internal/natstest. Processes are killed with SIGKILL at chosen
// moments to prove that no change is lost or applied twice.
package e2e
