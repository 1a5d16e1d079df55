//! leadsync: Microsoft commercial marketplace leads from an Azure table into a CRM,
//! with nothing lost and nothing doubled.
//!
//! Data flows one way: [`source`] rows -> [`lead`] events -> [`sink`] outcomes ->
//! [`state`] settlements and checkpoint, driven by [`pipeline`].

mod alloc;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod lead;
pub mod pipeline;
pub mod private_fs;
pub mod progress;
pub mod retry;
pub mod secret;
pub mod service;
pub mod sink;
pub mod source;
pub mod state;
pub mod task;
pub mod telemetry;
pub mod timestamp;

pub use daemon::{
    build_pipeline, build_sink, open_state, run, run_pipeline, Holding, LeaseHold, RunOptions,
    RunReport, StartError,
};
