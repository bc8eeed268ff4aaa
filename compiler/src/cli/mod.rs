//! The `slmc` binary's commands, one module per family; `args` holds the clap definitions.

pub mod args;
pub mod bench;
pub mod bundle;
pub mod info;
pub mod opt;
pub mod run;
pub mod serve;
pub mod serve_api;
pub mod serve_web;
