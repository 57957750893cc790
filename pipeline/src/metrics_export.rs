//! `vjepa metrics`: a run's metrics table (all its Parquet files, resumed runs merged by step)
//! as JSON Lines or CSV, so scripts and spreadsheets can read a run without a Parquet library —
//! e.g. on a GPU machine whose Python has torch but no pyarrow.

use std::io::Write;

use anyhow::Context;
use vjepa_storage::tables::{MetricsRow, read_metrics_all};
use vjepa_storage::{S3Settings, Store};

/// Output format of [`write_metrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsFormat {
    /// One JSON object per step and line; per-mask columns are arrays.
    Jsonl,
    /// A header line, then one line per step; per-mask columns are `;`-joined.
    Csv,
}

/// Column names, in output order (the Parquet table's, with `time` as Unix microseconds).
pub const COLUMNS: [&str; 21] = [
    "step",
    "epoch",
    "time_unix_us",
    "loss",
    "loss_per_mask",
    "lr",
    "weight_decay",
    "ema_momentum",
    "encoder_grad_norm",
    "predictor_grad_norm",
    "context_tokens",
    "target_tokens",
    "clips_per_sec",
    "step_time_s",
    "data_wait_s",
    "bytes_read",
    "decode_s",
    "target_std",
    "target_rank",
    "params_digest",
    "nvdec_clips",
];

/// Reads every metrics file of the run at `location` (the run's output directory: a path or an
/// object-store URL) and writes its rows, by step, to `out`. Returns the number of rows.
/// Errors name the location; a location without metrics is an error (a wrong path should not
/// look like an empty run).
pub fn write_metrics(
    location: &str,
    format: MetricsFormat,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    write_metrics_with(location, &S3Settings::default(), format, out)
}

/// [`write_metrics`] with the S3 settings of a job config (`storage.s3`: endpoint, region,
/// plain HTTP) for a run kept on an S3-compatible server.
pub fn write_metrics_with(
    location: &str,
    s3: &S3Settings,
    format: MetricsFormat,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = Store::open(location, s3, false)
        .with_context(|| format!("opening {}", vjepa_storage::redact_url(location)))?;
    let rows = runtime
        .block_on(read_metrics_all(&store))
        .with_context(|| {
            format!(
                "reading the metrics of {}",
                vjepa_storage::redact_url(location)
            )
        })?;
    if rows.is_empty() {
        anyhow::bail!(
            "{location} holds no metrics table (metrics.parquet or metrics-from-N.parquet)"
        );
    }
    if format == MetricsFormat::Csv {
        writeln!(out, "{}", COLUMNS.join(","))?;
    }
    for r in &rows {
        match format {
            MetricsFormat::Jsonl => writeln!(out, "{}", json_line(r))?,
            MetricsFormat::Csv => writeln!(out, "{}", csv_line(r))?,
        }
    }
    out.flush()?;
    Ok(rows.len())
}

/// A JSON number for `v`, `null` where JSON has none (NaN, ±inf: a diverged step stays visible
/// as a row).
fn num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn json_line(r: &MetricsRow) -> serde_json::Value {
    serde_json::json!({
        "step": r.step,
        "epoch": r.epoch,
        "time_unix_us": r.time_unix_us,
        "loss": num(r.loss),
        "loss_per_mask": r.loss_per_mask.iter().map(|&v| num(v)).collect::<Vec<_>>(),
        "lr": num(r.lr),
        "weight_decay": num(r.weight_decay),
        "ema_momentum": num(r.ema_momentum),
        "encoder_grad_norm": num(r.encoder_grad_norm),
        "predictor_grad_norm": num(r.predictor_grad_norm),
        "context_tokens": r.context_tokens,
        "target_tokens": r.target_tokens,
        "clips_per_sec": num(r.clips_per_sec),
        "step_time_s": num(r.step_time_s),
        "data_wait_s": num(r.data_wait_s),
        "bytes_read": r.bytes_read,
        "decode_s": num(r.decode_s),
        "target_std": num(r.target_std),
        "target_rank": num(r.target_rank),
        // Hex text: a u64 does not survive JSON readers that parse numbers as doubles.
        "params_digest": format!("{:016x}", r.params_digest),
        "nvdec_clips": r.nvdec_clips,
    })
}

fn join<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

fn csv_line(r: &MetricsRow) -> String {
    [
        r.step.to_string(),
        r.epoch.to_string(),
        r.time_unix_us.to_string(),
        r.loss.to_string(),
        join(&r.loss_per_mask),
        r.lr.to_string(),
        r.weight_decay.to_string(),
        r.ema_momentum.to_string(),
        r.encoder_grad_norm.to_string(),
        r.predictor_grad_norm.to_string(),
        join(&r.context_tokens),
        join(&r.target_tokens),
        r.clips_per_sec.to_string(),
        r.step_time_s.to_string(),
        r.data_wait_s.to_string(),
        r.bytes_read.to_string(),
        r.decode_s.to_string(),
        r.target_std.to_string(),
        r.target_rank.to_string(),
        format!("{:016x}", r.params_digest),
        r.nvdec_clips.to_string(),
    ]
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vjepa_storage::tables::TableWriter;

    fn row(step: u64, loss: f64) -> MetricsRow {
        MetricsRow {
            step,
            epoch: step / 10,
            time_unix_us: 1_700_000_000_000_000 + step as i64,
            loss,
            loss_per_mask: vec![loss - 0.1, loss + 0.1],
            lr: 1e-4,
            context_tokens: vec![100, 40],
            target_tokens: vec![20, 80],
            step_time_s: 0.5,
            params_digest: u64::MAX - step,
            ..MetricsRow::default()
        }
    }

    /// Writes `rows` as the table file `rel` of the local store at `dir`.
    fn write_table(dir: &std::path::Path, rel: &str, rows: &[MetricsRow]) {
        let store = Store::open(dir.to_str().unwrap(), &S3Settings::default(), true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = TableWriter::<MetricsRow>::create(&store, rel)
                .await
                .unwrap();
            for r in rows {
                w.push(r.clone());
            }
            w.close().await.unwrap();
        });
    }

    #[test]
    fn a_resumed_run_reads_as_one_table_by_step() {
        let tmp = tempfile::tempdir().unwrap();
        // Steps 0..3 from the first run; the resumed run redid step 2 (a later file wins).
        write_table(
            tmp.path(),
            "metrics.parquet",
            &[row(0, 1.0), row(1, 0.9), row(2, 0.8)],
        );
        write_table(
            tmp.path(),
            "metrics-from-2.parquet",
            &[row(2, 0.7), row(3, f64::NAN)],
        );
        let loc = tmp.path().to_str().unwrap();

        let mut out = Vec::new();
        assert_eq!(
            write_metrics(loc, MetricsFormat::Jsonl, &mut out).unwrap(),
            4
        );
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [0, 1, 2, 3]);
        assert_eq!(lines[2]["loss"].as_f64(), Some(0.7));
        assert!(lines[3]["loss"].is_null(), "NaN is null: {}", lines[3]);
        assert_eq!(lines[0]["loss_per_mask"][1].as_f64(), Some(1.1));
        assert_eq!(lines[0]["context_tokens"], serde_json::json!([100, 40]));
        assert_eq!(lines[1]["params_digest"], "fffffffffffffffe");
        for l in &lines {
            let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
            let mut want = COLUMNS.to_vec();
            want.sort_unstable();
            let mut keys = keys;
            keys.sort_unstable();
            assert_eq!(keys, want);
        }

        let mut out = Vec::new();
        write_metrics(loc, MetricsFormat::Csv, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), COLUMNS.join(","));
        let first: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(first.len(), COLUMNS.len());
        assert_eq!(first[0], "0");
        assert_eq!(first[3], "1");
        assert_eq!(first[4], "0.9;1.1");
        assert_eq!(first[10], "100;40");
        assert_eq!(lines.count(), 3);
    }

    #[test]
    fn a_location_without_metrics_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = tmp.path().to_str().unwrap();
        let err = write_metrics(loc, MetricsFormat::Csv, &mut Vec::new()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(loc) && text.contains("no metrics"), "{text}");
    }
}
