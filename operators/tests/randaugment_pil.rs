//! Each RandAugment operation against what Pillow's own functions give on the same frame
//! (golden written by `tools/reference/make_randaugment_golden.py`).

use vjepa_operators::randaugment::Op;

const GOLDEN_BIN: &[u8] = include_bytes!("goldens/randaugment_pil.bin");
const GOLDEN_TXT: &str = include_str!("goldens/randaugment_pil.txt");

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
    // `frame H W` starts a frame (its input is next in the .bin); every other line is a case
    // on the latest frame (its output is next).
    let mut at = 0usize;
    let mut take = |n: usize| {
        let part = &GOLDEN_BIN[at..at + n];
        at += n;
        part
    };
    let (mut input, mut size, mut cases) = (Vec::new(), (0, 0), 0);
    let mut report = Vec::new();
    for line in GOLDEN_TXT
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        if let Some(rest) = line.strip_prefix("frame ") {
            let dims: Vec<usize> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            size = (dims[0], dims[1]);
            input = take(size.0 * size.1 * 3).to_vec();
            continue;
        }
        let (h, w) = size;
        let n = h * w * 3;
        let want = take(n);
        let mut got = input.clone();
        let mut scratch = vec![0u8; n];
        op_of(line).apply(&mut got, &mut scratch, h, w);
        let diffs: Vec<i32> = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let off = diffs.iter().filter(|&&d| d > 0).count();
        println!("{h}x{w} {line:<18} max |ours − Pillow| {max}, values differing {off} of {n}");
        if max > 0 {
            report.push(format!("{h}x{w} {line}: max {max}, {off} values"));
        }
        cases += 1;
    }
    assert_eq!(at, GOLDEN_BIN.len(), "golden fully read");
    assert!(cases >= 40, "{cases} cases");
    assert!(report.is_empty(), "differs from Pillow: {report:?}");
}
