//! `vjepa convert` at the binary's edge: official `.pth.tar` (written by PyTorch) → our
//! safetensors → `.pth.tar` → safetensors again, and exit 2 naming the tensor on bad files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use vjepa_model::{Device, PthExport, VJepa};

fn golden(name: &str) -> PathBuf {
    repo_root().join("model/tests/goldens").join(name)
}

fn convert(input: &Path, output: &Path, config: Option<&Path>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("convert").arg(input).arg(output);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn official_file_to_ours_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let config = golden("pth_fixture.yaml");
    let first = tmp.path().join("ours.safetensors");
    let out = convert(&golden("pth_fixture.pth.tar"), &first, Some(&config));
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("step 3, epoch 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bytes = std::fs::read(&first).unwrap();
    let model = VJepa::from_safetensors(&bytes, &Device::Cpu).unwrap();
    assert_eq!(model.steps_done(), 3);
    assert_eq!(model.encoder_config().embed_dim, 24);

    // Ours → official layout (into a directory that doesn't exist yet) → ours, no config needed.
    let pth = tmp.path().join("sub/exported.pth.tar");
    assert_ok(&convert(&first, &pth, None));
    let second = tmp.path().join("again.safetensors");
    assert_ok(&convert(&pth, &second, None));
    let again = VJepa::from_safetensors(&std::fs::read(&second).unwrap(), &Device::Cpu).unwrap();
    // Our export is deterministic, so equal bytes mean equal tensors, configs and steps.
    let export = |m: &VJepa| m.to_pth(&PthExport::default()).unwrap();
    assert!(
        export(&again) == export(&model),
        "round trip changed the checkpoint"
    );
    assert_eq!(again.steps_done(), 3);

    // `inspect` reads both layouts; the PyTorch-written file needs the config's head counts.
    let inspect = |path: &std::path::Path, config: Option<&std::path::Path>| {
        let mut cmd = Command::new(bin());
        cmd.arg("inspect").arg(path);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ours = inspect(&first, None);
    assert!(
        ours.contains("objective vjepa, step 3") && ours.contains("encoder D=24"),
        "{ours}"
    );
    let official = inspect(&golden("pth_fixture.pth.tar"), Some(&config));
    assert!(official.starts_with("official checkpoint"), "{official}");
    assert!(
        official.contains("step 3") && official.contains("encoder D=24"),
        "{official}"
    );
}

#[test]
fn bad_inputs_exit_2_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let config = golden("pth_fixture.yaml");
    let out_path = tmp.path().join("out.safetensors");
    for (file, needle) in [
        (
            "pth_fixture_missing.pth.tar",
            "missing tensor `target_encoder.blocks.1.mlp.fc2.weight`",
        ),
        (
            "pth_fixture_badshape.pth.tar",
            "`predictor.predictor_proj.weight` has shape [16, 24], expected [24, 16]",
        ),
    ] {
        let out = convert(&golden(file), &out_path, Some(&config));
        assert_eq!(out.status.code(), Some(2), "{file}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{file}: {}", stderr(&out));
        assert!(!out_path.exists(), "nothing written for a bad input");
    }
    // An official file without the config that gives its shape.
    let out = convert(&golden("pth_fixture.pth.tar"), &out_path, None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
    // Unknown or identical extensions.
    let out = convert(
        &golden("pth_fixture.pth.tar"),
        &tmp.path().join("x.bin"),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = convert(
        &golden("pth_fixture.pth.tar"),
        &tmp.path().join("x.pth"),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Not a checkpoint at all.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors").unwrap();
    let out = convert(&junk, &tmp.path().join("y.pth.tar"), None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let junk = tmp.path().join("junk.pth.tar");
    std::fs::write(&junk, b"not a zip").unwrap();
    let out = convert(&junk, &out_path, Some(&config));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a PyTorch zip checkpoint"),
        "{}",
        stderr(&out)
    );
}
