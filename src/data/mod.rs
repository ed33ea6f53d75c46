//! Training data: text identity, query groups, file loaders and the conflict-free batch planner.
pub mod dataset;
pub mod load;
pub mod pairs;
pub mod planner;
pub mod text;

pub use dataset::{Cluster, Dataset, DatasetBuilder, LoadStats, TextId};
pub use load::{LoadOptions, load_files};
pub use pairs::{PairEpoch, PairSet, PairTargets, TargetKind};
pub use planner::{Batch, Batching, EpochPlan, FillNegatives, Mode, PlanSpec, Row, plan_epoch};
