//! Training data: text identity, query groups, file loaders and the conflict-free batch planner.
pub mod dataset;
pub mod load;
pub mod planner;
pub mod text;

pub use dataset::{Dataset, DatasetBuilder, LoadStats, TextId};
pub use load::{LoadOptions, load_files};
pub use planner::{Batch, EpochPlan, Mode, PlanSpec, Row, plan_epoch};
