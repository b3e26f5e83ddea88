//! One module per subcommand. Each owns its flags (a clap `Args` struct) and a `run` function.

pub mod audit;
pub mod classify;
pub mod compare;
pub mod dataset;
pub mod demo;
pub mod energy;
pub mod eval;
pub mod explain;
pub mod llm_check;
pub mod llm_sim;
pub mod report;
pub mod runs;
pub mod serve;
pub mod synth;
pub mod train;
pub mod users;
