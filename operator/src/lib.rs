//! `glm-operator`: reconciles `GLMModel` resources into Deployments, Services and weight caches,
//! and (in `gateway`) serves one OpenAI endpoint routing to every ready model.

pub mod autoscaler;
pub mod builders;
pub mod cli;
pub mod controller;
pub mod error;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod scope;
pub mod server;
pub mod status;
