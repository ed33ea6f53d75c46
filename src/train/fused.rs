//! ATen's fused AdamW through the C++ shim (`src/shim/fused_adamw.cpp`, compiled by `build.rs`
//! against libtorch): `tch` binds no multi-tensor optimizer kernel.
use std::ffi::{CStr, c_char, c_int, c_void};

use tch::Tensor;

use crate::error::{Error, Result};

unsafe extern "C" {
    fn multipos_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// One AdamW update, in place, of `[params, grads, exp_avgs, exp_avg_sqs, steps]` (as many tensors
/// in each, matching shapes; `steps` f32 scalars already counting this step), all on one device.
pub(crate) fn adamw(
    lists: [&Vec<Tensor>; 5],
    lr: f64,
    (beta1, beta2): (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    let n = lists[0].len();
    if lists.iter().any(|l| l.len() != n) {
        return Err(Error::Internal(
            "fused AdamW: lists of different lengths".into(),
        ));
    }
    // tch's handles point at libtorch tensors, which the shim reads as such.
    let handles: Vec<Vec<*mut c_void>> = lists
        .iter()
        .map(|l| l.iter().map(|t| t.as_ptr() as *mut c_void).collect())
        .collect();
    let mut error = [0 as c_char; 512];
    // SAFETY: every pointer is a live tch tensor handle (the lists outlive the call), `n` is every
    // list's length, and `error` is a buffer of the length passed; the shim catches C++ exceptions.
    let failed = tch::no_grad(|| unsafe {
        multipos_fused_adamw(
            handles[0].as_ptr(),
            handles[1].as_ptr(),
            handles[2].as_ptr(),
            handles[3].as_ptr(),
            handles[4].as_ptr(),
            n as c_int,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
            error.as_mut_ptr(),
            error.len(),
        )
    });
    if failed != 0 {
        // SAFETY: the shim wrote a NUL-terminated message into `error`.
        let why = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
        return Err(Error::Internal(format!("fused AdamW: {why}")));
    }
    Ok(())
}
