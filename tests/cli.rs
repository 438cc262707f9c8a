//! The `burn-megatron` binary, run as a user runs it.

use std::process::Command;

fn burn_megatron(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_burn-megatron"))
        .args(args)
        .output()
        .expect("running burn-megatron");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn layout_prints_megatron_groups() {
    let (ok, stdout, stderr) =
        burn_megatron(&["layout", "--world-size", "8", "--tp", "2", "--pp", "2"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("tp 2 x pp 2 x dp 2 on 8 ranks"),
        "{stdout}"
    );
    // Rank 5: tp 1, dp 0, pp 1; groups as Megatron-LM builds them.
    let rank5 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("5 "))
        .unwrap();
    let fields: Vec<&str> = rank5.split_whitespace().collect();
    assert_eq!(&fields[..4], &["5", "1", "0", "1"], "{rank5}");
    assert!(
        rank5.contains("[4, 5]") && rank5.contains("[5, 7]") && rank5.contains("[1, 5]"),
        "{rank5}"
    );
}

#[test]
fn layout_prints_stage_layers_and_the_schedule() {
    let (ok, stdout, stderr) = burn_megatron(&[
        "layout",
        "--world-size",
        "2",
        "--pp",
        "2",
        "--virtual-stages",
        "2",
        "--heads",
        "4",
        "--hidden",
        "64",
        "--layers",
        "8",
        "--micro-batches",
        "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("stage 0: layers 0-1 + embeddings; layers 4-5\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stage 1: layers 2-3; layers 6-7 + final norm, output layer and loss"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "interleaved 1F1B (2 stages, 4 micro-batches, 2 chunks per stage): bubble 0.1250"
        ),
        "{stdout}"
    );
    // Stage 1 warms up with the first two micro-batches through chunk 0, then alternates.
    assert!(
        stdout.contains("stage 1: F0.c0 F1.c0 F0.c1 B0.c1 F1.c1 B1.c1"),
        "{stdout}"
    );
}

#[test]
fn layout_errors_say_what_to_change() {
    let (ok, _, stderr) = burn_megatron(&["layout", "--world-size", "6", "--tp", "4"]);
    assert!(!ok);
    assert!(
        stderr.contains("world size 6 is not divisible by tensor-parallel size 4"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&[
        "layout",
        "--world-size",
        "8",
        "--tp",
        "8",
        "--heads",
        "12",
        "--hidden",
        "768",
        "--layers",
        "12",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("tensor-parallel size 8 does not divide 12 attention heads"),
        "{stderr}"
    );
}

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/megatron-data/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn preprocess_and_inspect_reproduce_megatron() {
    let out = tempfile::tempdir().unwrap();
    let prefix = out.path().join("shakespeare").display().to_string();
    let tokenizers = format!("{}/data/tokenizers", env!("CARGO_MANIFEST_DIR"));
    let (ok, stdout, stderr) = burn_megatron(&[
        "preprocess",
        "--input",
        &fixture("docs.jsonl"),
        "--json-keys",
        "text",
        "--output-prefix",
        &prefix,
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        &format!("{tokenizers}/gpt2-vocab.json"),
        "--merge-file",
        &format!("{tokenizers}/gpt2-merges.txt"),
        "--append-eod",
        "--workers",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("600 documents, 24103 tokens, 48206 bytes"),
        "{stdout}"
    );
    let dataset = format!("{prefix}_text_document");
    for extension in ["bin", "idx"] {
        let ours = std::fs::read(format!("{dataset}.{extension}")).unwrap();
        let megatron =
            std::fs::read(fixture(&format!("shakespeare_text_document.{extension}"))).unwrap();
        assert!(
            ours == megatron,
            ".{extension} differs from Megatron-Core's"
        );
    }

    let dump = out.path().join("samples.safetensors");
    let (ok, stdout, stderr) = burn_megatron(&[
        "inspect",
        &dataset,
        "--split",
        "949,50,1",
        "--seq-length",
        "64",
        "--seed",
        "1234",
        "--num-samples",
        "200,40,8",
        "--dump-samples",
        dump.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("600 documents, 600 sequences, 24103 tokens, dtype U16"),
        "{stdout}"
    );
    assert!(
        stdout.contains("document 0 (15 tokens): \"First Citizen:\\nBefore we proceed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("train: sequences 0..569, 362 samples"),
        "{stdout}"
    );
    let ours = std::fs::read(&dump).unwrap();
    let megatron = std::fs::read(fixture("gptdataset_samples.safetensors")).unwrap();
    let (ours, megatron) = (
        safetensors::SafeTensors::deserialize(&ours).unwrap(),
        safetensors::SafeTensors::deserialize(&megatron).unwrap(),
    );
    for split in ["train", "valid", "test"] {
        for array in ["tokens", "labels"] {
            let name = format!("{split}.{array}");
            let (a, b) = (ours.tensor(&name).unwrap(), megatron.tensor(&name).unwrap());
            assert_eq!(a.shape(), b.shape(), "{name}");
            assert!(
                a.data() == b.data(),
                "{name} differs from Megatron-Core's samples"
            );
        }
    }
}

#[test]
fn data_errors_name_the_file_and_the_fix() {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = burn_megatron(&["inspect", out.path().join("missing").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("missing.idx"), "{stderr}");

    let input = out.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"fine\"}\n{\"body\": \"no text key\"}\n",
    )
    .unwrap();
    let (ok, _, stderr) = burn_megatron(&[
        "preprocess",
        "--input",
        input.to_str().unwrap(),
        "--output-prefix",
        out.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.jsonl line 2: no key `text`"),
        "{stderr}"
    );
}

/// `input.*` tensors of a fixture's reference file, re-saved under the names `forward`
/// reads.
fn forward_inputs(model: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let reference = std::fs::read(format!(
        "{}/tests/fixtures/{model}/reference.safetensors",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = ["input_ids", "attention_mask"]
        .iter()
        .map(|name| {
            (
                name.to_string(),
                reference.tensor(&format!("input.{name}")).unwrap(),
            )
        })
        .collect();
    let path = dir.join(format!("{model}-inputs.safetensors"));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn forward_reproduces_hf_logits_at_every_tensor_parallel_size() {
    let out = tempfile::tempdir().unwrap();
    for model in [
        "gpt2-a",
        "gpt2-a-sharded",
        "llama-a",
        "bloom-a",
        "gptbigcode-a",
    ] {
        let inputs = forward_inputs("gpt2-a", out.path());
        for tp in [1, 2, 4] {
            let hf = format!("{}/tests/fixtures/{model}", env!("CARGO_MANIFEST_DIR"));
            let output = out.path().join(format!("{model}-tp{tp}.safetensors"));
            assert_reference_logits(
                model.trim_end_matches("-sharded"),
                &hf,
                tp,
                &inputs,
                &output,
            );
        }
    }
}

/// Runs `forward` on the Hugging Face checkpoint in `hf` at tensor-parallel size `tp` and
/// checks the logits against fixture `model`'s reference.
fn assert_reference_logits(
    model: &str,
    hf: &str,
    tp: usize,
    inputs: &std::path::Path,
    output: &std::path::Path,
) {
    let reference = std::fs::read(format!(
        "{}/tests/fixtures/{model}/reference.safetensors",
        env!("CARGO_MANIFEST_DIR"),
    ))
    .unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let expected: Vec<f32> = reference
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (ok, _, stderr) = burn_megatron(&[
        "forward",
        "--hf",
        hf,
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--tp",
        &tp.to_string(),
    ]);
    assert!(ok, "{model} tp={tp}: {stderr}");
    let ours = std::fs::read(output).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let logits = ours.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[2, 16, 512], "{model} tp={tp}");
    let worst = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .zip(&expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    assert!(
        worst / scale < 1e-4,
        "{model} tp={tp}: relative error {}",
        worst / scale
    );
}

/// Every tensor of the Hugging Face safetensors files in `dir`: dtype, shape and bytes.
fn hf_tensor_bytes(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut tensors = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (key, view) in file.tensors() {
            let value = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            assert!(tensors.insert(key.clone(), value).is_none(), "{key} twice");
        }
    }
    tensors
}

/// Each GPT fixture converts to a native checkpoint split for tp 2 x pp 2 and back to
/// Hugging Face safetensors sharded at 100KB: every tensor equals the original bit for
/// bit, and the result gives the reference logits in `forward`.
#[test]
fn hf_checkpoints_round_trip_through_the_native_format() {
    let out = tempfile::tempdir().unwrap();
    for model in ["gpt2-a", "llama-a", "bloom-a", "gptbigcode-a"] {
        let original = format!("{}/tests/fixtures/{model}", env!("CARGO_MANIFEST_DIR"));
        let native = out.path().join(format!("{model}-native"));
        let hf = out.path().join(format!("{model}-hf"));
        let (ok, stdout, stderr) = burn_megatron(&[
            "convert",
            "--load",
            &original,
            "--save",
            native.to_str().unwrap(),
            "--to",
            "native",
            "--tp",
            "2",
            "--pp",
            "2",
            "--print-checkpoint-structure",
        ]);
        assert!(ok, "{model}: {stderr}");
        assert!(
            stdout.contains(
                "param layers.1.attention.query.weight\t[64, 64]\tF32\tsplit along dimension 1"
            ),
            "{model}: {stdout}"
        );
        // Stage 1 of 2 wrote the second layer from its own ranks.
        let checkpoint =
            std::fs::read_to_string(native.join("iter_0000000/rank-00002.json")).unwrap();
        assert!(checkpoint.contains("layers.1."), "{model}: {checkpoint}");
        assert!(!checkpoint.contains("layers.0."), "{model}: {checkpoint}");

        let (ok, stdout, stderr) = burn_megatron(&[
            "convert",
            "--load",
            native.to_str().unwrap(),
            "--save",
            hf.to_str().unwrap(),
            "--to",
            "hf",
            "--max-shard-size",
            "100KB",
            "--print-checkpoint-structure",
        ]);
        assert!(ok, "{model}: {stderr}");
        assert!(stdout.contains("F32"), "{stdout}");
        let index = std::fs::read_to_string(hf.join("model.safetensors.index.json")).unwrap();
        assert!(index.contains("\"weight_map\""), "{index}");
        let (before, after) = (
            hf_tensor_bytes(std::path::Path::new(&original)),
            hf_tensor_bytes(&hf),
        );
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{model}: the same tensor names"
        );
        for (name, tensor) in &before {
            assert!(
                after[name] == *tensor,
                "{model}: {name} differs after the round trip"
            );
        }
        let inputs = forward_inputs(model, out.path());
        let logits = out.path().join(format!("{model}-round-trip.safetensors"));
        assert_reference_logits(model, hf.to_str().unwrap(), 2, &inputs, &logits);
    }
}

/// A model trained from scratch exports to Hugging Face (its config.json written from the
/// model), which `forward` reads; wrong requests are refused with the fix.
#[test]
fn trained_checkpoints_export_to_hf_and_mistakes_are_named() {
    let out = tempfile::tempdir().unwrap();
    let save = out.path().join("run");
    let mut args = vec![
        "train",
        "--tp",
        "2",
        "--dp",
        "1",
        "--steps",
        "2",
        "--save",
        save.to_str().unwrap(),
        "--position-embedding",
        "rope",
        "--normalization",
        "RMSNorm",
        "--activation",
        "swiglu",
        "--disable-bias",
        "--untie-embeddings",
    ];
    args.extend(TINY);
    let (ok, stdout, stderr) = burn_megatron(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("saved"), "{stdout}");
    let hf = out.path().join("hf");
    let (ok, stdout, stderr) = burn_megatron(&[
        "convert",
        "--load",
        save.to_str().unwrap(),
        "--save",
        hf.to_str().unwrap(),
        "--to",
        "hf",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Llama"), "{stdout}");
    let config = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(config.contains("\"model_type\": \"llama\""), "{config}");
    assert!(hf.join("model.safetensors").is_file());
    let inputs = out.path().join("ids.safetensors");
    let ids: Vec<u8> = (0..16i64).flat_map(|t| (t * 311).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 16], &ids).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &inputs).unwrap();
    let (ok, stdout, stderr) = burn_megatron(&[
        "forward",
        "--hf",
        hf.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        out.path().join("logits.safetensors").to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("[1, 16, 50257]"), "{stdout}");

    let (ok, _, stderr) = burn_megatron(&[
        "convert",
        "--load",
        save.to_str().unwrap(),
        "--save",
        hf.to_str().unwrap(),
        "--to",
        "hf",
    ]);
    assert!(!ok && stderr.contains("is not empty"), "{stderr}");
    let (ok, _, stderr) = burn_megatron(&[
        "convert",
        "--load",
        save.to_str().unwrap(),
        "--save",
        out.path().join("x").to_str().unwrap(),
        "--to",
        "hf",
        "--max-shard-size",
        "lots",
    ]);
    assert!(!ok && stderr.contains("--max-shard-size lots"), "{stderr}");
    let (ok, _, stderr) = burn_megatron(&[
        "convert",
        "--load",
        out.path().to_str().unwrap(),
        "--save",
        out.path().join("y").to_str().unwrap(),
        "--to",
        "native",
    ]);
    assert!(!ok && stderr.contains("no complete checkpoint"), "{stderr}");
}

/// A save cut off before its commit (the process aborts) leaves the previous checkpoint
/// as the one that loads; resuming from it logs the uninterrupted run's losses.
#[test]
fn a_save_cut_off_mid_write_is_ignored_on_resume() {
    let out = tempfile::tempdir().unwrap();
    let save = out.path().join("run");
    let train = |extra: &[&str], metrics: &std::path::Path, crash: Option<&str>| {
        let mut args = vec![
            "train",
            "--tp",
            "2",
            "--dp",
            "1",
            "--steps",
            "4",
            "--log-interval",
            "1",
        ];
        args.extend(TINY);
        args.extend(["--metrics", metrics.to_str().unwrap()]);
        args.extend(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_burn-megatron"));
        command.args(&args);
        if let Some(iteration) = crash {
            command.env("BURN_MEGATRON_CRASH_BEFORE_COMMIT", iteration);
        }
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let whole = out.path().join("whole.jsonl");
    let (ok, _, stderr) = train(&[], &whole, None);
    assert!(ok, "{stderr}");
    let saving = ["--save", save.to_str().unwrap(), "--save-interval", "1"];
    let cut = out.path().join("cut.jsonl");
    let (ok, _, stderr) = train(&saving, &cut, Some("3"));
    assert!(!ok, "the save of step 3 aborts the run: {stderr}");
    assert!(
        save.join("iter_0000003.tmp").is_dir(),
        "the cut-off save's files are there"
    );
    assert_eq!(
        std::fs::read_to_string(save.join("latest")).unwrap().trim(),
        "iter_0000002"
    );

    let (ok, stdout, stderr) = train(&["--load", save.to_str().unwrap()], &cut, None);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("ignoring") && stdout.contains("iter_0000003.tmp"),
        "{stdout}"
    );
    assert!(stdout.contains("iteration 2"), "{stdout}");
    let (resumed, uninterrupted) = (metric_values(&cut), metric_values(&whole));
    // Steps 1-3 of the cut run (step 3 trained before its save aborted), then 3-4 again.
    assert_eq!(resumed.len(), 5, "{resumed:?}");
    for (a, b) in resumed[3..].iter().zip(&uninterrupted[2..]) {
        let (a, b): (f64, f64) = (a.0.parse().unwrap(), b.0.parse().unwrap());
        assert!(
            ((a - b) / b).abs() < 1e-5,
            "resumed loss {a}, uninterrupted {b}"
        );
    }
}

/// The flags of a tiny model that trains in seconds.
const TINY: &[&str] = &[
    "--num-layers",
    "1",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "16",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "2",
    "--eval-iters",
    "1",
];

#[test]
fn train_runs_on_megatron_data_and_writes_metrics() {
    let out = tempfile::tempdir().unwrap();
    let prefix = out.path().join("docs").display().to_string();
    let (ok, _, stderr) = burn_megatron(&[
        "preprocess",
        "--input",
        &fixture("docs.jsonl"),
        "--output-prefix",
        &prefix,
        "--append-eod",
    ]);
    assert!(ok, "{stderr}");
    let data = format!("{prefix}_text_document");
    let metrics = out.path().join("metrics.jsonl");
    let config = out.path().join("train.toml");
    std::fs::write(
        &config,
        "steps = 3\nlog_interval = 1\neval_interval = 3\nsplit = \"90,10,0\"\n",
    )
    .unwrap();
    let mut args = vec![
        "train",
        "--config",
        config.to_str().unwrap(),
        "--data-path",
        "0.5",
        &data,
        "0.5",
        &data,
        "--metrics",
        metrics.to_str().unwrap(),
        "--data-cache-path",
        out.path().to_str().unwrap(),
    ];
    args.extend(TINY);
    let (ok, stdout, stderr) = burn_megatron(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("global batch 2 = micro batch 1 x 1 micro-batches x dp 2"),
        "{stdout}"
    );
    assert!(stdout.contains("eval perplexity"), "{stdout}");
    let lines: Vec<String> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 3, "one line per logged step: {lines:?}");
    for key in [
        "\"step\"",
        "\"loss\"",
        "\"lr\"",
        "\"grad_norm\"",
        "\"tokens_per_s\"",
    ] {
        assert!(lines.iter().all(|l| l.contains(key)), "{key} in {lines:?}");
    }
    assert!(lines[2].contains("\"eval_loss\""), "{}", lines[2]);
}

#[test]
fn wrong_train_settings_name_the_setting_and_the_fix() {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = burn_megatron(&[
        "train",
        "--tp",
        "4",
        "--dp",
        "1",
        "--num-attention-heads",
        "6",
        "--hidden-size",
        "120",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("tensor-parallel size 4 does not divide 6 attention heads"),
        "{stderr}"
    );

    let config = out.path().join("bad.toml");
    std::fs::write(&config, "steps = 3\nlearning_rate = 0.1\n").unwrap();
    let (ok, _, stderr) = burn_megatron(&["train", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("unknown field `learning_rate`"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&["train", "--precision", "bf16"]);
    assert!(!ok);
    assert!(
        stderr.contains("--precision bf16 needs --device cuda"),
        "{stderr}"
    );
    let (ok, _, stderr) = burn_megatron(&["train", "--precision", "fp8"]);
    assert!(
        !ok && stderr.contains("--precision fp8: use fp32, bf16 or fp16"),
        "{stderr}"
    );

    let missing = out.path().join("nowhere").display().to_string();
    let (ok, _, stderr) = burn_megatron(&["train", "--data-path", &missing]);
    assert!(!ok);
    assert!(
        stderr.contains("nowhere.idx does not exist") && stderr.contains("preprocess"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&[
        "train",
        "--pp",
        "2",
        "--virtual-stages",
        "2",
        "--global-batch-size",
        "24",
        "--micro-batch-size",
        "4",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("multiple of the pipeline-parallel size 2, got 3")
            && stderr.contains("--global-batch-size 32"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&["train", "--initial-loss-scale", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("--initial-loss-scale 0 must be a finite number of at least 1"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&["train", "--pp", "2", "--pipeline-layers", "1,2"]);
    assert!(!ok);
    assert!(
        stderr.contains("--pipeline-layers [1, 2]") && stderr.contains("add up to the 4 layers"),
        "{stderr}"
    );

    let (ok, _, stderr) = burn_megatron(&[
        "train",
        "--global-batch-size",
        "6",
        "--micro-batch-size",
        "4",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "global batch size 6 is not a multiple of micro batch size 4 x data-parallel size 2"
        ),
        "{stderr}"
    );
}

#[test]
fn pipeline_stages_log_the_losses_of_one_rank() {
    let out = tempfile::tempdir().unwrap();
    let run = |name: &str, layout: &[&str]| {
        let metrics = out.path().join(format!("{name}.jsonl"));
        let mut args = vec![
            "train",
            "--steps",
            "3",
            "--log-interval",
            "1",
            "--num-layers",
            "4",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "8",
            "--eval-iters",
            "1",
            "--metrics",
            metrics.to_str().unwrap(),
        ];
        args.extend(layout);
        let (ok, stdout, stderr) = burn_megatron(&args);
        assert!(ok, "{stderr}");
        (metric_values(&metrics), stdout)
    };
    let (single, _) = run("single", &["--tp", "1", "--pp", "1", "--dp", "1"]);
    let (parallel, stdout) = run(
        "parallel",
        &[
            "--tp",
            "2",
            "--pp",
            "2",
            "--dp",
            "2",
            "--sequence-parallel",
            "--use-distributed-optimizer",
        ],
    );
    assert!(
        stdout.contains("pipeline: 1F1B (2 stages, 4 micro-batches): bubble (pp - 1) / m = 0.2500"),
        "the log reports the bubble: {stdout}"
    );
    assert!(
        stdout.contains("optimizer memory per rank: master weights"),
        "the log reports the optimizer memory: {stdout}"
    );
    let (interleaved, stdout) = run(
        "interleaved",
        &[
            "--tp",
            "1",
            "--pp",
            "2",
            "--dp",
            "1",
            "--virtual-stages",
            "2",
        ],
    );
    assert!(
        stdout.contains(
            "interleaved 1F1B (2 stages, 8 micro-batches, 2 chunks per stage): bubble \
             (pp - 1) / (v x m) = 0.0625"
        ),
        "{stdout}"
    );
    assert_eq!(single.len(), 3);
    for (name, run) in [
        ("tp 2 x pp 2 x dp 2", &parallel),
        ("interleaved", &interleaved),
    ] {
        assert_eq!(run.len(), 3);
        for ((a, _), (b, _)) in run.iter().zip(&single) {
            let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(((a - b) / b).abs() < 1e-4, "{name} loss {a}, one rank {b}");
        }
    }
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port().to_string()
}

fn metric_values(path: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let field = |key: &str| {
                let start = line.find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
                line[start..].split([',', '}']).next().unwrap().to_string()
            };
            (field("loss"), field("grad_norm"))
        })
        .collect()
}

#[test]
fn launched_processes_train_like_thread_ranks() {
    let out = tempfile::tempdir().unwrap();
    let prefix = out.path().join("docs").display().to_string();
    let (ok, _, stderr) = burn_megatron(&[
        "preprocess",
        "--input",
        &fixture("docs.jsonl"),
        "--output-prefix",
        &prefix,
        "--append-eod",
    ]);
    assert!(ok, "{stderr}");
    let data = format!("{prefix}_text_document");
    // Tensor x data parallelism, then pipeline x data parallelism (activations and
    // gradients between stages over TCP; the first stage holds only the embeddings).
    let layouts: [(&str, &[&str]); 2] = [
        ("tp2-dp2", &["--tp", "2", "--pp", "1", "--dp", "2"]),
        (
            "pp2-dp2",
            &[
                "--tp",
                "1",
                "--pp",
                "2",
                "--dp",
                "2",
                "--pipeline-layers",
                "0,1",
            ],
        ),
    ];
    for (name, layout) in layouts {
        let threads = out.path().join(format!("{name}-threads.jsonl"));
        let processes = out.path().join(format!("{name}-processes.jsonl"));
        let train = |metrics: &std::path::Path| -> Vec<String> {
            let mut args: Vec<String> = ["train", "--steps", "3", "--log-interval", "1"]
                .iter()
                .chain(layout)
                .chain(&["--data-path", &data, "--metrics", metrics.to_str().unwrap()])
                .map(|s| s.to_string())
                .collect();
            args.extend(TINY.iter().map(|s| s.to_string()));
            args
        };
        let thread_args = train(&threads);
        let (ok, _, stderr) =
            burn_megatron(&thread_args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{stderr}");

        let port = free_port();
        let mut launch_args: Vec<String> = [
            "launch",
            "--nproc-per-node",
            "4",
            "--master-port",
            &port,
            "--",
            env!("CARGO_BIN_EXE_burn-megatron"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        launch_args.extend(train(&processes));
        let (ok, stdout, stderr) =
            burn_megatron(&launch_args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{name}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("[rank 3] done: 3 steps"),
            "{name}: the last rank logs: {stdout}"
        );
        let (a, b) = (metric_values(&threads), metric_values(&processes));
        assert_eq!(a.len(), 3);
        assert_eq!(
            a, b,
            "{name}: TcpGroup processes and thread ranks log the same losses and norms"
        );
    }
}

#[test]
fn launch_stops_every_rank_when_one_fails() {
    let started = std::time::Instant::now();
    let (ok, _, stderr) = burn_megatron(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "sh",
        "-c",
        "if [ \"$RANK\" = 1 ]; then echo dying >&2; exit 3; fi; sleep 60",
    ]);
    assert!(!ok);
    assert!(stderr.contains("[rank 1] dying"), "{stderr}");
    assert!(
        stderr.contains("rank 1 failed: exited with exit status: 3"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// `bench collectives` over two launched CPU processes checks every collective against
/// the host's values and prints its table.
#[test]
fn bench_collectives_checks_every_result() {
    let out = tempfile::tempdir().unwrap();
    let rows = out.path().join("rows.jsonl");
    let binary = env!("CARGO_BIN_EXE_burn-megatron");
    let port = free_port();
    let (ok, stdout, stderr) = burn_megatron(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
        binary,
        "bench",
        "collectives",
        "--min-size",
        "4KiB",
        "--max-size",
        "64KiB",
        "--iters",
        "2",
        "--output",
        rows.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("reduce_scatter"), "{stdout}");
    let rows = std::fs::read_to_string(&rows).unwrap();
    // 4 KiB, 16 KiB and 64 KiB, three operations each, all checked.
    assert_eq!(rows.lines().count(), 9, "{rows}");
    assert!(
        rows.lines().all(|row| row.contains("\"checked\": true")),
        "{rows}"
    );
}

#[test]
fn selective_and_full_recompute_train_like_storing_everything() {
    let out = tempfile::tempdir().unwrap();
    let run = |recompute: &[&str]| {
        let metrics = out.path().join(format!("{}.jsonl", recompute.join("_")));
        let mut args = vec!["train", "--tp", "2", "--dp", "1", "--steps", "3"];
        args.extend(["--log-interval", "1", "--recompute-granularity"]);
        args.extend(recompute);
        args.extend(TINY);
        args.extend(["--metrics", metrics.to_str().unwrap()]);
        let (ok, stdout, stderr) = burn_megatron(&args);
        assert!(ok, "{recompute:?}: {stderr}");
        (metric_values(&metrics), stdout)
    };
    let (stored, stdout) = run(&["none"]);
    assert!(stdout.contains("recompute none;"), "{stdout}");
    for (recompute, logged) in [
        (&["selective"][..], "recompute selective;"),
        (&["full"], "recompute full (every layer, groups of 1);"),
        (
            &["full", "--recompute-method", "block"],
            "recompute full (the first layer of each model chunk);",
        ),
    ] {
        let (recomputed, stdout) = run(recompute);
        assert!(stdout.contains(logged), "{stdout}");
        assert_eq!(recomputed.len(), 3, "{recomputed:?}");
        for ((loss, norm), (want_loss, want_norm)) in recomputed.iter().zip(&stored) {
            for (got, want) in [(loss, want_loss), (norm, want_norm)] {
                let (got, want): (f64, f64) = (got.parse().unwrap(), want.parse().unwrap());
                assert!(
                    ((got - want) / want).abs() < 1e-5,
                    "{recompute:?} recompute {got}, storing everything {want}"
                );
            }
        }
    }
    for flag in ["--recompute-num-layers", "--recompute-method"] {
        let value = if flag == "--recompute-method" {
            "block"
        } else {
            "2"
        };
        let (ok, _, stderr) = burn_megatron(&["train", flag, value]);
        assert!(
            !ok && stderr.contains("--recompute-granularity full"),
            "{stderr}"
        );
    }
}

#[test]
fn bench_ops_checks_the_reference_paths_on_cpu() {
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("ops.jsonl");
    let (ok, stdout, stderr) = burn_megatron(&[
        "bench",
        "ops",
        "--device",
        "cpu",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            ["gemm", "batched gemm", "linear", "attention"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    // 8 GEMM paths (4 transposes, a transposed view, a linear layer's backward as one
    // group, the accumulating weight-gradient GEMM onto a sum and without), a linear
    // layer's forward with its bias and its 3 gradients, 8 batched ones (4 transposes, 2
    // layouts), and 16 attention outputs and gradients (2 masks, 2 layouts), every one
    // within its limit.
    assert_eq!(rows.len(), 36, "{stdout}");
    assert!(rows.iter().all(|row| row.ends_with(" ok")), "{stdout}");
    // The same rows as JSON lines.
    let json = std::fs::read_to_string(&output).unwrap();
    let checks: Vec<&str> = json
        .lines()
        .filter(|l| l.contains("\"kind\": \"check\""))
        .collect();
    assert_eq!(checks.len(), 36, "{json}");
    assert!(
        checks.iter().all(|l| l.ends_with("\"ok\": true}")),
        "{json}"
    );
    // An unknown type, and types the CPU does not run, are refused with what to use.
    for (dtypes, says) in [("bf17", "use f32, tf32, bf16 or f16"), ("bf16", "f32 only")] {
        let (ok, _, stderr) =
            burn_megatron(&["bench", "ops", "--device", "cpu", "--dtypes", dtypes]);
        assert!(!ok && stderr.contains(says), "--dtypes {dtypes}: {stderr}");
    }
}

#[test]
fn train_refuses_settings_that_would_diverge_and_stops_when_it_does() {
    let small = [
        "train",
        "--tp",
        "1",
        "--dp",
        "1",
        "--num-layers",
        "1",
        "--steps",
        "3",
    ];
    for (flag, expected) in [
        ("--adam-eps=0", "--adam-eps 0: must be above 0"),
        ("--lr=-1", "--lr -1: must be at least 0"),
        ("--adam-beta2=1", "--adam-beta2 1: must be in [0, 1)"),
        (
            "--micro-batch-size=0",
            "--micro-batch-size must be at least 1",
        ),
        (
            "--init-method-std=0",
            "standard deviation 0 must be above 0",
        ),
        // [4, 4, 100000, 100000] fp32 scores: 596 GiB on each rank.
        ("--seq-length=100000", "one layer's attention scores"),
    ] {
        let (ok, _, stderr) = burn_megatron(&[&small[..], &[flag]].concat());
        assert!(!ok && stderr.contains(expected), "{flag}: {stderr}");
    }
    // A learning rate this large turns the weights into infinities after the first step.
    let (ok, stdout, stderr) = burn_megatron(&[&small[..], &["--lr", "1e30"]].concat());
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("step 2: the gradient norm is NaN: training diverged"),
        "{stderr}"
    );
}
