//! The integration tests: one binary, real PostgreSQL (a throwaway cluster with logical
//! replication, one database per test) and the real RabbitMQ.

mod console;
mod foundation;
mod support;
