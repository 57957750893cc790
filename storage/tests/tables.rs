//! Parquet tables: round trips, row groups, empty files, schema checks.

use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use vjepa_storage::tables::{
    self, MetricsRow, MetricsWriter, QuarantineRow, QuarantineWriter, metrics_schema,
    quarantine_schema,
};
use vjepa_storage::{S3Settings, StorageError, Store};

fn row(step: u64) -> MetricsRow {
    MetricsRow {
        step,
        epoch: step / 2 + 1,
        time_unix_us: 1_763_800_000_000_000 + step as i64,
        loss: 0.5 / (step as f64 + 1.0),
        loss_per_mask: vec![0.25 + step as f64, 0.75],
        lr: 1e-4 * step as f64,
        weight_decay: 0.04,
        ema_momentum: 0.998,
        encoder_grad_norm: 1.5,
        predictor_grad_norm: 2.5,
        context_tokens: vec![100 + step as i64, 50],
        target_tokens: if step == 1 { vec![] } else { vec![7, 8] },
        clips_per_sec: 12.0,
        step_time_s: 0.3,
        data_wait_s: 0.01,
        bytes_read: 123_456,
        decode_s: 0.5,
        target_std: 0.25,
        target_rank: 3.5,
        params_digest: 0xfedc_ba98_7654_3210 + step,
        nvdec_clips: step % 3,
    }
}

fn local_store(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().to_str().unwrap(), &S3Settings::default(), false).unwrap()
}

#[tokio::test]
async fn metrics_round_trip_with_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let mut w = MetricsWriter::create(&store, "runs/r1/metrics.parquet")
        .await
        .unwrap();
    w.push(row(0));
    w.push(row(1));
    assert_eq!(w.pending(), 2);
    w.flush().await.unwrap();
    assert_eq!(w.pending(), 0);
    w.flush().await.unwrap(); // nothing buffered: no empty row group
    w.push(row(2));
    // Not visible until closed.
    assert!(!store.exists("runs/r1/metrics.parquet").await.unwrap());
    assert_eq!(w.close().await.unwrap(), 3);

    let back = tables::read_metrics(&store, "runs/r1/metrics.parquet")
        .await
        .unwrap();
    assert_eq!(back, vec![row(0), row(1), row(2)]);

    let bytes = store.get("runs/r1/metrics.parquet").await.unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
    assert_eq!(b.metadata().num_row_groups(), 2);
    assert_eq!(b.schema().as_ref(), metrics_schema().as_ref());
}

/// A table written before `target_rank` and `nvdec_clips` existed still reads (those as 0): a
/// run resumed or read by a newer binary keeps its history. Another missing column is refused.
#[tokio::test]
async fn metrics_from_before_the_added_columns_still_read() {
    use tables::TableRow;
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let rows = vec![row(4), row(5)];
    let full = MetricsRow::to_batch(&rows).unwrap();
    let schema = metrics_schema();
    let without = |names: &[&str]| {
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| !names.contains(&schema.field(i).name().as_str()))
            .collect();
        let batch = full.project(&keep).unwrap();
        let mut bytes = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        Bytes::from(bytes)
    };
    store
        .put("old.parquet", without(&["target_rank", "nvdec_clips"]))
        .await
        .unwrap();
    let back = tables::read_metrics(&store, "old.parquet").await.unwrap();
    let expected: Vec<MetricsRow> = rows
        .iter()
        .map(|r| MetricsRow {
            target_rank: 0.0,
            nvdec_clips: 0,
            ..r.clone()
        })
        .collect();
    assert_eq!(back, expected);

    store
        .put("rank.parquet", without(&["nvdec_clips"]))
        .await
        .unwrap();
    let back = tables::read_metrics(&store, "rank.parquet").await.unwrap();
    assert_eq!(back[1].target_rank, rows[1].target_rank);
    assert_eq!(back[1].nvdec_clips, 0);

    store
        .put("broken.parquet", without(&["decode_s"]))
        .await
        .unwrap();
    let err = tables::read_metrics(&store, "broken.parquet")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Schema { .. }), "{err}");
}

#[tokio::test]
async fn empty_quarantine_file_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let w = QuarantineWriter::create(&store, "quarantine.parquet")
        .await
        .unwrap();
    assert_eq!(w.close().await.unwrap(), 0);
    assert!(
        tables::read_quarantine(&store, "quarantine.parquet")
            .await
            .unwrap()
            .is_empty()
    );
    let schema = tables::read_schema(&store, "quarantine.parquet")
        .await
        .unwrap();
    assert_eq!(schema.as_ref(), quarantine_schema().as_ref());
    let time = schema.field_with_name("time").unwrap();
    assert_eq!(
        time.data_type(),
        &arrow::datatypes::DataType::Timestamp(
            arrow::datatypes::TimeUnit::Microsecond,
            Some("UTC".into())
        )
    );
    // Every column is always set but the object version (unknown for some records).
    assert!(
        schema
            .fields()
            .iter()
            .all(|f| f.is_nullable() == (f.name() == "object_version"))
    );
    let bytes = store.get("quarantine.parquet").await.unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
    assert_eq!(b.metadata().file_metadata().num_rows(), 0);
}

#[tokio::test]
async fn quarantine_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let rows = vec![
        QuarantineRow {
            uri: "s3://b/v/a.mp4".into(),
            reason: "decode_error".into(),
            detail: "qtdemux: no moov".into(),
            time_unix_us: 1,
            object_version: Some("9b2cf535f27731c974343645a3985328".into()),
        },
        QuarantineRow {
            uri: "file:///x/ü b.mp4".into(),
            reason: "path_escapes_store".into(),
            detail: String::new(),
            time_unix_us: -5,
            object_version: None,
        },
    ];
    let mut w = QuarantineWriter::create(&store, "q.parquet").await.unwrap();
    for r in &rows {
        w.push(r.clone());
        w.flush().await.unwrap();
    }
    assert_eq!(w.close().await.unwrap(), 2);
    assert_eq!(
        tables::read_quarantine(&store, "q.parquet").await.unwrap(),
        rows
    );

    // A table from before `object_version` existed reads with the versions unknown.
    use tables::TableRow;
    let full = QuarantineRow::to_batch(&rows).unwrap();
    let old = full.project(&[0, 1, 2, 3]).unwrap();
    assert_eq!(
        old.schema().fields().len() + 1,
        full.schema().fields().len()
    );
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, old.schema(), None).unwrap();
    w.write(&old).unwrap();
    w.close().unwrap();
    store.put("old.parquet", Bytes::from(bytes)).await.unwrap();
    let back = tables::read_quarantine(&store, "old.parquet")
        .await
        .unwrap();
    assert_eq!(back[0].object_version, None);
    assert_eq!(back[0].uri, rows[0].uri);
    assert_eq!(back[1].time_unix_us, -5);
}

#[tokio::test]
async fn wrong_table_or_not_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let w = QuarantineWriter::create(&store, "q.parquet").await.unwrap();
    w.close().await.unwrap();
    let err = tables::read_metrics(&store, "q.parquet").await.unwrap_err();
    assert!(matches!(err, StorageError::Schema { .. }), "{err}");

    store
        .put("junk.parquet", Bytes::from_static(b"not parquet at all"))
        .await
        .unwrap();
    let err = tables::read_quarantine(&store, "junk.parquet")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Parquet { .. }), "{err}");

    assert!(matches!(
        MetricsWriter::create(&store, "../escape.parquet").await,
        Err(StorageError::PathEscapesRoot { .. })
    ));
}

/// The pipeline drives these from spawned tasks: their futures must be `Send`.
#[tokio::test]
async fn futures_are_send() {
    fn is_send<T: Send>(_: T) {}
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir);
    let mut w = MetricsWriter::create(&store, "m.parquet").await.unwrap();
    is_send(w.flush());
    let mut q = QuarantineWriter::create(&store, "q.parquet").await.unwrap();
    is_send(q.flush());
    is_send(MetricsWriter::create(&store, "m2.parquet"));
    is_send(store.get("x"));
    is_send(store.list());
    is_send(vjepa_storage::dataset::open("x", &S3Settings::default()));
    is_send(vjepa_storage::checkpoints::latest(&store));
    is_send(w.close());
    is_send(q.close());
}
