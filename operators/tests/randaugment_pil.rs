//! Each RandAugment operation against what Pillow's own functions give on the same frame
//! (golden written by `tools/reference/make_randaugment_golden.py`).

use vjepa_operators::randaugment::Op;

const GOLDEN_BIN: &[u8] = include_bytes!("goldens/randaugment_pil.bin");
const GOLDEN_TXT: &str = include_str!("goldens/randaugment_pil.txt");
const H: usize = 20;
const W: usize = 24;

fn op_of(line: &str) -> Op {
    let mut words = line.split_whitespace();
    let name = words.next().expect("an operation");
    let arg = |w: Option<&str>| -> f64 { w.expect("an argument").parse().expect("a number") };
    let a = words.next();
    match name {
        "AutoContrast" => Op::AutoContrast,
        "Equalize" => Op::Equalize,
        "Invert" => Op::Invert,
        "Posterize" => Op::Posterize(arg(a) as u32),
        "Solarize" => Op::Solarize(arg(a) as u32),
        "SolarizeAdd" => Op::SolarizeAdd(arg(a) as u32),
        "Color" => Op::Color(arg(a)),
        "Contrast" => Op::Contrast(arg(a)),
        "Brightness" => Op::Brightness(arg(a)),
        "Sharpness" => Op::Sharpness(arg(a)),
        "Rotate" => Op::Rotate(arg(a)),
        "ShearX" => Op::ShearX(arg(a)),
        "ShearY" => Op::ShearY(arg(a)),
        "TranslateX" => Op::TranslateX(arg(a)),
        "TranslateY" => Op::TranslateY(arg(a)),
        other => panic!("unknown operation {other}"),
    }
}

#[test]
fn operations_equal_pillow() {
    let n = H * W * 3;
    let lines: Vec<&str> = GOLDEN_TXT
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(GOLDEN_BIN.len(), n * (lines.len() + 1), "golden size");
    let input = &GOLDEN_BIN[..n];
    let mut report = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let want = &GOLDEN_BIN[n * (i + 1)..n * (i + 2)];
        let mut got = input.to_vec();
        let mut scratch = vec![0u8; n];
        op_of(line).apply(&mut got, &mut scratch, H, W);
        let diffs: Vec<i32> = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let off = diffs.iter().filter(|&&d| d > 0).count();
        println!("{line:<18} max |ours − Pillow| {max}, values differing {off} of {n}");
        if max > 0 {
            report.push(format!("{line}: max {max}, {off} values"));
        }
    }
    assert!(report.is_empty(), "differs from Pillow: {report:?}");
}
