//! `forward`: logits of a Hugging Face GPT checkpoint, split over tensor-parallel thread
//! ranks on the CPU.

use std::path::PathBuf;

use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::{Error, Result};
use burn_megatron_models::gpt::hf::HfCheckpoint;
use clap::Args;

type Backend = burn_ndarray::NdArray<f32>;

/// Flags of `forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Directory of the checkpoint (`config.json`, `model.safetensors` or shards with
    /// `model.safetensors.index.json`).
    #[arg(long)]
    hf: PathBuf,
    /// Safetensors file with `input_ids` (int64 `[batch, seq]`) and optionally
    /// `attention_mask` (1 for tokens, 0 for padding).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `logits` (float32 `[batch, seq, vocab]`).
    #[arg(long)]
    output: PathBuf,
    /// Tensor-parallel size (thread ranks).
    #[arg(long, default_value_t = 1)]
    tp: usize,
}

fn read_i64(tensors: &safetensors::SafeTensors, names: &[&str]) -> Result<Option<TensorData>> {
    let Some(view) = names.iter().find_map(|name| tensors.tensor(name).ok()) else {
        return Ok(None);
    };
    if view.dtype() != safetensors::Dtype::I64 || view.shape().len() != 2 {
        return Err(Error::InvalidData(format!(
            "{} must be int64 [batch, seq], found {:?} {:?}",
            names[0],
            view.dtype(),
            view.shape()
        )));
    }
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Ok(Some(TensorData::new(values, view.shape().to_vec())))
}

/// Runs the checkpoint on the inputs and writes the logits.
pub fn run(args: &ForwardArgs) -> Result<()> {
    let bytes = std::fs::read(&args.inputs).map_err(|e| Error::io(&args.inputs, e))?;
    let inputs = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::InvalidData(format!("{}: {e}", args.inputs.display())))?;
    let ids = read_i64(&inputs, &["input_ids", "input.input_ids"])?.ok_or_else(|| {
        Error::InvalidData(format!(
            "{} has no `input_ids` tensor",
            args.inputs.display()
        ))
    })?;
    let mask = read_i64(&inputs, &["attention_mask", "input.attention_mask"])?;
    let checkpoint = HfCheckpoint::open(&args.hf)?;
    let config = checkpoint.gpt_config()?;
    if let Some(&bad) = ids.as_slice::<i64>().ok().and_then(|v| {
        v.iter()
            .find(|&&t| t < 0 || t as usize >= config.vocab_size)
    }) {
        return Err(Error::InvalidData(format!(
            "input_ids contains {bad}, outside the vocabulary of {} tokens",
            config.vocab_size
        )));
    }
    let layout = Layout::new(args.tp, 1, 1)?;
    let logits = LocalCluster::new(layout).run(|ctx| {
        let device = Default::default();
        let (_, model) = checkpoint.load::<Backend>(&ctx, &device)?;
        let ids = Tensor::<Backend, 2, Int>::from_data(ids.clone(), &device);
        let padding = mask
            .as_ref()
            .map(|mask| Tensor::<Backend, 2, Int>::from_data(mask.clone(), &device).equal_elem(0));
        let local = model.forward(ids, padding.as_ref().map(|p: &Tensor<Backend, 2, Bool>| p));
        let full = ctx.tensor().all_gather(local, 2)?;
        Ok::<_, Error>(full.narrow(2, 0, config.vocab_size).into_data())
    })?;
    let logits = &logits[0];
    let values = logits
        .to_vec::<f32>()
        .map_err(|e| Error::InvalidData(format!("logits: {e:?}")))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        logits.shape.as_slice().to_vec(),
        &bytes,
    )
    .map_err(|e| Error::InvalidData(e.to_string()))?;
    safetensors::serialize_to_file([("logits", view)], None, &args.output)
        .map_err(|e| Error::InvalidData(format!("{}: {e}", args.output.display())))?;
    println!(
        "wrote logits {:?} of {} ({:?}) at tp {}",
        logits.shape.as_slice(),
        args.hf.display(),
        checkpoint.family(),
        args.tp
    );
    Ok(())
}
