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
