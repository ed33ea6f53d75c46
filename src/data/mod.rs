//! Training data: text identity, query groups, file and table loaders and the conflict-free batch
//! planner.
pub mod columns;
pub mod dataset;
pub mod load;
pub mod pairs;
pub mod planner;
pub(crate) mod table;
pub mod text;

pub use columns::{Columns, Names};
pub use dataset::{Cluster, Dataset, DatasetBuilder, LoadStats, TextId};
pub use load::{LoadOptions, load_files};
pub use pairs::{PairEpoch, PairSet, PairTargets, TargetKind};
pub use planner::{Batch, Batching, EpochPlan, FillNegatives, Mode, PlanSpec, Row, plan_epoch};
