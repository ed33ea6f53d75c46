//! The model a run trains: loaded from where the config says, with its settings applied.
use crate::config::{Precision, RunConfig};
use crate::device;
use crate::error::{Error, Result};
use crate::model::SentenceModel;

/// Loads the model a config names onto its device.
pub fn load_model(cfg: &RunConfig) -> Result<SentenceModel> {
    device::set_threads(cfg.model.threads)?;
    let dev = device::parse_device(cfg.model.device.as_deref().unwrap_or("auto"))?;
    let dir = cfg.model.dir();
    let mut model = SentenceModel::load(&dir, dev)?;
    configure_model(cfg, &mut model)?;
    Ok(model)
}

/// Applies the config's model settings (sequence length, precision) to a loaded model.
pub(crate) fn configure_model(cfg: &RunConfig, model: &mut SentenceModel) -> Result<()> {
    if let Some(n) = cfg.model.max_seq_length {
        model.set_max_seq_length(n)?;
    }
    if cfg.model.precision == Precision::Bf16 {
        if model.device() == tch::Device::Cpu {
            return Err(Error::Usage(
                "model.precision = \"bf16\" needs a CUDA device: CPU runs train in fp32".into(),
            ));
        }
        model.set_bf16(true);
    }
    Ok(())
}
