//! `vjepa make-samples` makes the same pictures every time: the quick-start corpus (and with
//! it a quick-start run) is reproducible from a fresh machine.

mod common;

use std::path::Path;

use vjepa_ingest::{Decoder, DecoderOptions, VideoInfo};

/// Every decoded frame of every video in `dir`, by file name.
fn pictures(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    names
        .into_iter()
        .map(|name| {
            let bytes = bytes::Bytes::from(std::fs::read(dir.join(&name)).unwrap());
            let clip = dec
                .decode_clip(bytes, &mut |info: &VideoInfo| {
                    (0..info.num_frames).collect()
                })
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, clip.frames)
        })
        .collect()
}

#[test]
fn two_runs_make_the_same_pictures() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // 12 as in the README's quick start: every default pattern (the noise ones included, whose
    // generator is shared by the process) and every default codec, made side by side.
    common::make_corpus(&a, 12);
    common::make_corpus(&b, 12);
    let (pa, pb) = (pictures(&a), pictures(&b));
    assert_eq!(pa.len(), 12);
    for ((name, x), (other, y)) in pa.iter().zip(&pb) {
        assert_eq!(name, other);
        assert!(!x.is_empty(), "{name}: no frames");
        assert!(x == y, "{name}: the two runs decode to different pictures");
    }
}
