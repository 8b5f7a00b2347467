//! sluice's end-to-end tests: one binary, one module per area, all against the real control
//! plane and git server of `sluice_testenv`.

mod agent;
mod badinput;
mod cli;
mod corpus;
mod faults;
mod harness_cluster;
mod harness_git;
mod install;
mod languages;
mod oci;
mod operate;
mod plugins;
mod policies;
mod render;
mod safety;
mod shards;
mod support;
mod sync;
mod takeover;
