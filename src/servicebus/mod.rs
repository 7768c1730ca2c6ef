//! The Service Bus data plane over AMQP 1.0 (`fe2o3-amqp`), behind the engine's
//! [`Broker`](crate::broker::Broker) trait, in one module that Microsoft's crate can replace
//! once its AMQP version is published.

pub mod client;
pub mod connection_string;
pub mod credential;
pub mod management;
pub mod message;
pub mod peek;
pub mod target;
pub mod tcp;
