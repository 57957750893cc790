//! `vjepa extract` end to end (issue 8): a short pretraining run's checkpoint over a small
//! corpus with a bad file, 2 segments × 3 views: one row per clip in video / segment / view
//! order, the bad file quarantined beside the table, rows identical on a second run, and each
//! row's embedding equal to the target encoder's mean-pooled output on that clip decoded and
//! transformed independently (the job's clip decoder + `target_features`).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use vjepa_model::{Device, VJepa};
use vjepa_storage::Store;
use vjepa_storage::features::read_features;

fn extract(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("extract")
        .args(args)
        .output()
        .expect("run vjepa extract")
}

#[test]
fn extract_writes_one_row_per_clip_equal_to_a_direct_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 3);
    std::fs::write(videos.join("broken.mp4"), b"not a video").unwrap();
    let out = tmp.path().join("out");
    let config = write_config(&tmp.path().join("c.yaml"), &videos, &out, 4);
    assert_ok(&run_train(&config, &[], &[]));
    let checkpoint = out.join("checkpoints/step-00000004.safetensors");
    assert!(checkpoint.exists());

    // An index with labels, the official `path label` format.
    let mut names: Vec<String> = std::fs::read_dir(&videos)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let index = tmp.path().join("index.csv");
    let lines: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{} {}", videos.join(n).display(), i % 2))
        .collect();
    std::fs::write(&index, lines.join("\n") + "\n").unwrap();

    let table = tmp.path().join("f/features.parquet");
    let args = [
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--out",
        table.to_str().unwrap(),
        "--segments",
        "2",
        "--views",
        "3",
        "--batch-size",
        "4",
    ];
    let run = extract(&args);
    assert_ok(&run);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(
        table.parent().unwrap().to_str().unwrap(),
        &Default::default(),
        false,
    )
    .unwrap();
    let rows = rt
        .block_on(read_features(&store, "features.parquet"))
        .unwrap();
    let quarantine = rt
        .block_on(vjepa_storage::tables::read_quarantine(
            &store,
            "features.quarantine.parquet",
        ))
        .unwrap();
    assert_eq!(quarantine.len(), 1, "{quarantine:?}");
    assert!(quarantine[0].uri.ends_with("broken.mp4"));
    assert_eq!(quarantine[0].reason, "not_a_video");

    // 3 good videos × 2 segments × 3 views, in index order, segment-major.
    assert_eq!(rows.len(), 18);
    let model =
        VJepa::from_safetensors(&std::fs::read(&checkpoint).unwrap(), &Device::Cpu).unwrap();
    let d = model.encoder_config().embed_dim;
    let mut per_video: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for r in &rows {
        assert_eq!(r.embedding.len(), d);
        assert!(r.tokens.is_empty());
        assert_eq!(r.frames.len(), 16);
        assert!(r.embedding.iter().all(|v| v.is_finite()));
        per_video
            .entry(r.uri.clone())
            .or_default()
            .push((r.segment, r.view));
    }
    assert_eq!(per_video.len(), 3);
    for pairs in per_video.values() {
        let expected: Vec<(u64, u64)> = (0..2).flat_map(|s| (0..3).map(move |v| (s, v))).collect();
        assert_eq!(pairs, &expected);
    }
    let label_of = |uri: &str| {
        let name = uri.rsplit('/').next().unwrap();
        (names.iter().position(|n| n == name).unwrap() % 2).to_string()
    };
    assert!(rows.iter().all(|r| r.label == label_of(&r.uri)));

    // Deterministic: the same command gives the same rows.
    let again = tmp.path().join("f/again.parquet");
    let mut args2 = args.to_vec();
    args2[5] = again.to_str().unwrap();
    assert_ok(&extract(&args2));
    let rows2 = rt.block_on(read_features(&store, "again.parquet")).unwrap();
    assert_eq!(rows, rows2);

    // Each row equals the encoder on that clip, decoded and cropped on its own.
    vjepa_ingest::init().unwrap();
    let mut decoder = vjepa_ingest::Decoder::new(Default::default()).unwrap();
    let size = model.encoder_config().crop_size;
    for r in rows.iter().step_by(5) {
        let clip = decode_row_clip(
            &mut decoder,
            &r.uri,
            &r.frames,
            RowCrop::View {
                view: r.view as usize,
                views: 3,
            },
            size,
        );
        let direct = mean_pooled(model.target_features(&clip).unwrap());
        let max = direct
            .iter()
            .zip(&r.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 1e-4,
            "{} seg {} view {}: max diff {max}",
            r.uri,
            r.segment,
            r.view
        );
    }

    // Clips of another size (`--size 80` of a 64 model): the backbone is built for it, the
    // checkpoint's weights with a sin-cos table built for the new grid, as the official
    // evaluation builds its own at the evaluation resolution. So our checkpoint and its
    // official-layout export give the same features, the rebuilt encoder's.
    let pth = tmp.path().join("exported.pth.tar");
    let converted = Command::new(bin())
        .arg("convert")
        .arg(&checkpoint)
        .arg(&pth)
        .output()
        .unwrap();
    assert_ok(&converted);
    let at_80 = |ckpt: &std::path::Path, name: &str| {
        let out = tmp.path().join("f").join(name);
        let run = extract(&[
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--size",
            "80",
        ]);
        assert_ok(&run);
        assert!(
            String::from_utf8_lossy(&run.stderr).contains("backbone built for the input size"),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        rt.block_on(read_features(&store, name)).unwrap()
    };
    let ours = at_80(&checkpoint, "ours-80.parquet");
    let exported = at_80(&pth, "pth-80.parquet");
    assert_eq!(ours.len(), 3);
    let rebuilt = model.target_encoder().for_input_size(80).unwrap();
    for (a, b) in ours.iter().zip(&exported) {
        assert_eq!((&a.uri, &a.frames), (&b.uri, &b.frames));
        let diff = a
            .embedding
            .iter()
            .zip(&b.embedding)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{}: {diff}", a.uri);
        let clip = decode_row_clip(
            &mut decoder,
            &a.uri,
            &a.frames,
            RowCrop::View { view: 0, views: 1 },
            80,
        );
        let direct = mean_pooled(rebuilt.forward(&clip, None).unwrap());
        let diff = direct
            .iter()
            .zip(&a.embedding)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{}: {diff} from the rebuilt encoder", a.uri);
    }
}

/// Acceptance 3: `vjepa extract` on an official-layout `.pth.tar` (the PyTorch-written
/// `pth_fixture.pth.tar`) writes the features PyTorch computes for the same weights and clips.
/// The golden (tools/reference/make_extract_golden.py) holds a real FFV1/Matroska video whose
/// samples are known exactly, the spec §9 frame indices of its 2 segments, and the target
/// encoder's tokens for 3 spatial views of each, computed in float64 by the reference model
/// from the checkpoint's weights.
#[test]
fn pth_checkpoint_features_equal_pytorch() {
    let goldens = repo_root().join("model/tests/goldens");
    let golden = candle_core::safetensors::load(
        goldens.join("extract_golden.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tokens = golden["tokens"].to_dtype(candle_core::DType::F32).unwrap();
    let (segments, views, n, d) = tokens.dims4().unwrap();
    let tokens = tokens.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let embedding = golden["embedding"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let frames = golden["frames"].to_vec2::<i64>().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    std::fs::copy(
        goldens.join("extract_clip.mkv"),
        videos.join("extract_clip.mkv"),
    )
    .unwrap();
    let table = tmp.path().join("features.parquet");
    let run = extract(&[
        "--checkpoint",
        goldens.join("pth_fixture.pth.tar").to_str().unwrap(),
        "--config",
        goldens.join("pth_fixture.yaml").to_str().unwrap(),
        "--index",
        &format!("{}/", videos.display()),
        "--segments",
        &segments.to_string(),
        "--views",
        &views.to_string(),
        "--tokens",
        "--out",
        table.to_str().unwrap(),
    ]);
    assert_ok(&run);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(tmp.path().to_str().unwrap(), &Default::default(), false).unwrap();
    let rows = rt
        .block_on(read_features(&store, "features.parquet"))
        .unwrap();
    assert_eq!(rows.len(), segments * views);
    let mut worst = 0f32;
    for row in &rows {
        let (s, v) = (row.segment as usize, row.view as usize);
        assert_eq!(row.frames, frames[s], "segment {s} frame indices");
        let at = (s * views + v) * n * d;
        let want = &tokens[at..at + n * d];
        assert_eq!(row.tokens.len(), n * d);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in row.tokens.iter().zip(want) {
            worst = worst.max((a - b).abs() / scale);
        }
        let want = &embedding[(s * views + v) * d..(s * views + v + 1) * d];
        for (a, b) in row.embedding.iter().zip(want) {
            worst = worst.max((a - b).abs() / scale);
        }
    }
    println!("extract vs PyTorch on the .pth.tar: max relative error {worst:.2e}");
    assert!(worst < 1e-5, "max relative error {worst}");
}

/// `--video-decoder nvdec` where GStreamer registered no NVDEC decoder (no NVIDIA driver, as
/// on CI) is refused before any work, saying why; a wrong name is refused by the parser.
#[test]
fn nvdec_is_refused_without_nvdec_decoders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("features.parquet");
    let out_arg = out.to_str().unwrap();
    let with_decoder = |name: &str| {
        extract(&[
            "--checkpoint",
            "missing.safetensors",
            "--index",
            "missing.csv",
            "--out",
            out_arg,
            "--video-decoder",
            name,
        ])
    };
    let bad = with_decoder("vaapi");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("software, nvdec"));
    if !vjepa_ingest::nvdec_decoders().unwrap().is_empty() {
        return; // a GPU machine: NVDEC exists, nothing to refuse
    }
    let run = with_decoder("nvdec");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    // Refused on the decoder, before the checkpoint or the index is even opened.
    assert!(
        err.contains("--video-decoder nvdec") && err.contains("nvcodec"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Input refused before any work exits 2 (a size that is not whole patches, a file that is
/// not a checkpoint); a run where no video could be read exits 1 and leaves no empty features
/// table, only the quarantine table saying why.
#[test]
fn refusals_exit_2_and_an_unreadable_corpus_leaves_no_table() {
    let tmp = tempfile::tempdir().unwrap();
    let goldens = repo_root().join("model/tests/goldens");
    let checkpoint = goldens.join("pth_fixture.pth.tar");
    let config = goldens.join("pth_fixture.yaml");
    let videos = tmp.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    std::fs::write(videos.join("broken.mp4"), b"not a video").unwrap();
    let out = tmp.path().join("f.parquet");
    let run = |checkpoint: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        extract(&args)
    };
    let index = format!("{}/", videos.display());
    let all_bad = run(&checkpoint, &["--index", &index]);
    assert_eq!(all_bad.status.code(), Some(1));
    assert!(!out.exists(), "no empty table");
    assert!(tmp.path().join("f.quarantine.parquet").exists());

    let odd_size = run(&checkpoint, &["--index", &index, "--size", "36"]);
    assert_eq!(odd_size.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&odd_size.stderr).contains("--size 36"));
    let not_a_checkpoint = tmp.path().join("junk.safetensors");
    std::fs::write(&not_a_checkpoint, b"junk").unwrap();
    let junk = run(&not_a_checkpoint, &["--index", &index]);
    assert_eq!(junk.status.code(), Some(2), "{junk:?}");
}
