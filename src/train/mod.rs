//! Training: tasks and their plan, the trainable state, the optimizer and schedule, the one step
//! pipeline, checkpoints, and the single-process run.
pub mod build;
pub(crate) mod card;
pub mod checkpoint;
pub mod exchange;
pub mod flat;
mod fused;
pub mod load;
pub mod metrics;
pub mod mining;
pub mod nonfinite;
pub mod optim;
pub mod plan;
pub mod policy;
pub mod prefetch;
pub mod prepare;
pub mod run;
pub mod state;
pub mod step;
pub mod task;
mod tensorboard;
pub mod trainer;
pub mod validation;
pub mod versions;

pub use run::{RunSummary, run};
pub use state::TrainState;
pub use step::{StepInput, StepOptions};
pub use trainer::{StepStats, StepTimes, Trainer};
