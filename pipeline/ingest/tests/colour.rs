//! Colour conversion follows the stream's tags, and untagged HD gets what ffmpeg (and so decord,
//! the official loader) gives it: BT.601.

use std::path::Path;
use std::process::Command;

use vjepa_ingest::{Decoder, DecoderOptions};

fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg not found: run ops/setup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

fn check(dir: &Path, name: &str, tags: &[&str]) -> f64 {
    let path = dir.join(format!("{name}.mp4"));
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1280x720:rate=30:duration=0.2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
    ];
    args.extend_from_slice(tags);
    args.push(p);
    ffmpeg(&args);
    // ffmpeg's own default conversion of the first frame (what decord hands the official code).
    let reference = ffmpeg(&[
        "-i",
        p,
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]);
    let data = std::fs::read(&path).expect("read").into();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let clip = dec.decode_clip(data, &mut |_| vec![0]).expect("decode");
    let db = psnr(clip.frame(0).expect("frame"), &reference);
    println!("{name}: {db:.1} dB against ffmpeg's default RGB");
    db
}

#[test]
fn untagged_and_tagged_hd_convert_like_ffmpeg() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(check(dir.path(), "untagged", &[]) >= 40.0);
    let tagged = [
        "-colorspace",
        "bt709",
        "-color_primaries",
        "bt709",
        "-color_trc",
        "bt709",
    ];
    assert!(check(dir.path(), "bt709", &tagged) >= 40.0);
}
