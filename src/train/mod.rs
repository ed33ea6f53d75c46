//! Training: optimizer and schedule, the step-by-step trainer, and the single-process run.
pub mod checkpoint;
pub mod optim;
pub mod run;
pub mod trainer;

pub use run::{RunSummary, run};
pub use trainer::{StepOptions, StepStats, Trainer};
