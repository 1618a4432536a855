//! The integration tests: one binary, real PostgreSQL (a throwaway cluster with logical
//! replication, one database per test) and the real RabbitMQ.

mod amqp;
mod cdc;
mod console;
mod engine;
mod engine_state;
mod files;
mod foundation;
mod jobs;
mod support;
mod webhooks;
mod wire;
