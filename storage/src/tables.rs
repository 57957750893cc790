//! Parquet outputs written to a [`Store`] as the run goes.
//!
//! Rows are buffered by `push`; `flush` turns the buffer into a row group and hands its bytes to
//! the store's upload (local staging file or S3 multipart); the file becomes visible, complete,
//! after `close`. Schemas are fixed and all columns non-null so downstream tools (pandas,
//! DuckDB, Polars) can read them without guessing.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, ListBuilder,
    RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{
    DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    UInt64Type,
};
use bytes::Bytes;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::error_chain;
use crate::{StorageError, Store};

/// One training step's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsRow {
    /// Global step (0-based).
    pub step: u64,
    /// Epoch (as the official loop counts it).
    pub epoch: u64,
    /// Wall-clock time of the step's end, microseconds since the Unix epoch (UTC).
    pub time_unix_us: i64,
    /// Total loss.
    pub loss: f64,
    /// Loss of each mask configuration.
    pub loss_per_mask: Vec<f64>,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Weight decay used for the step.
    pub weight_decay: f64,
    /// EMA momentum of the target encoder.
    pub ema_momentum: f64,
    /// Total gradient norm of the encoder.
    pub encoder_grad_norm: f64,
    /// Total gradient norm of the predictor.
    pub predictor_grad_norm: f64,
    /// Context tokens kept, per mask configuration.
    pub context_tokens: Vec<i64>,
    /// Target tokens predicted, per mask configuration.
    pub target_tokens: Vec<i64>,
    /// Throughput over the step.
    pub clips_per_sec: f64,
    /// Duration of the step, seconds.
    pub step_time_s: f64,
    /// Time the step waited for data, seconds.
    pub data_wait_s: f64,
    /// Object-store bytes fetched for the step's clips (this process's share).
    pub bytes_read: u64,
    /// Seconds spent fetching and decoding the step's clips, summed over clips (decoding runs
    /// on several threads and ahead of the step, so this can exceed the step time).
    pub decode_s: f64,
    /// Collapse signal: std of the target encoder's (normalised) features across the batch,
    /// mean over tokens and dims (near 0: the representations collapsed).
    pub target_std: f64,
    /// Effective rank (participation ratio) of the target encoder's normalised token features
    /// (near 1: dimensional collapse, which `target_std` does not show). 0 in tables written
    /// before the column existed.
    pub target_rank: f64,
    /// Digest of the model's parameter bytes after the step (`VJepa::params_digest`): in
    /// data-parallel training every worker's digest equals this one (the job checks it).
    pub params_digest: u64,
    /// Clips of the step an NVDEC decoder decoded (the whole batch's; the rest were decoded
    /// in software), to tell how much of a run NVDEC really took. 0 in tables written
    /// before the column existed.
    pub nvdec_clips: u64,
}

/// One video that could not be used, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuarantineRow {
    /// Full URI of the video.
    pub uri: String,
    /// Stable short reason word (e.g. `decode_error`, `path_escapes_store`).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// When it was quarantined, microseconds since the Unix epoch (UTC).
    pub time_unix_us: i64,
    /// The object version found bad (its ETag, unquoted), when known: a video fixed under the
    /// same name is another version, not covered by this record.
    pub object_version: Option<String>,
}

/// One clip trained on: which video, which frames, which crop (written when `outputs.clips`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClipRow {
    /// Step whose batch held the clip (0-based).
    pub step: u64,
    /// Position of the clip in the global batch.
    pub slot: u64,
    /// Full URI of the video.
    pub uri: String,
    /// Frame numbers read from the video.
    pub frames: Vec<i64>,
    /// Crop box in source pixels: top, left, height, width.
    pub crop: [i64; 4],
    /// Horizontal flip.
    pub flip: bool,
}

pub(crate) fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn f64_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float64, false))
}

/// The non-null item field of our `list<float>` columns (embeddings, tokens, probabilities).
pub(crate) fn f32_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

pub(crate) fn i64_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Int64, false))
}

/// Arrow schema of the metrics table.
pub fn metrics_schema() -> SchemaRef {
    let f64_list = DataType::List(f64_item());
    let i64_list = DataType::List(i64_item());
    Arc::new(Schema::new(vec![
        Field::new("step", DataType::Int64, false),
        Field::new("epoch", DataType::Int64, false),
        Field::new("time", ts_type(), false),
        Field::new("loss", DataType::Float64, false),
        Field::new("loss_per_mask", f64_list, false),
        Field::new("lr", DataType::Float64, false),
        Field::new("weight_decay", DataType::Float64, false),
        Field::new("ema_momentum", DataType::Float64, false),
        Field::new("encoder_grad_norm", DataType::Float64, false),
        Field::new("predictor_grad_norm", DataType::Float64, false),
        Field::new("context_tokens", i64_list.clone(), false),
        Field::new("target_tokens", i64_list, false),
        Field::new("clips_per_sec", DataType::Float64, false),
        Field::new("step_time_s", DataType::Float64, false),
        Field::new("data_wait_s", DataType::Float64, false),
        Field::new("bytes_read", DataType::Int64, false),
        Field::new("decode_s", DataType::Float64, false),
        Field::new("target_std", DataType::Float64, false),
        Field::new("target_rank", DataType::Float64, false),
        Field::new("params_digest", DataType::UInt64, false),
        Field::new("nvdec_clips", DataType::Int64, false),
    ]))
}

/// Metrics columns added after the first tables were written: a table without them still
/// reads (as 0), so a run resumed or read by a newer binary keeps its history.
const METRICS_ADDED: [&str; 2] = ["target_rank", "nvdec_clips"];

/// Arrow schema of the quarantine table.
pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uri", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("time", ts_type(), false),
        Field::new("object_version", DataType::Utf8, true),
    ]))
}

/// Quarantine columns added after the first release: tables written before read without them.
const QUARANTINE_ADDED: [&str; 1] = ["object_version"];

/// Arrow schema of the clips table.
pub fn clips_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("step", DataType::Int64, false),
        Field::new("slot", DataType::Int64, false),
        Field::new("uri", DataType::Utf8, false),
        Field::new("frames", DataType::List(i64_item()), false),
        Field::new("crop_top", DataType::Int64, false),
        Field::new("crop_left", DataType::Int64, false),
        Field::new("crop_height", DataType::Int64, false),
        Field::new("crop_width", DataType::Int64, false),
        Field::new("flip", DataType::Boolean, false),
    ]))
}

/// Steps and epochs are stored as int64 (Parquet has no unsigned 64-bit logical type that all
/// readers agree on); values above `i64::MAX` cannot occur in practice and are clamped.
pub(crate) fn u64_to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn metrics_batch(rows: &[MetricsRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let mut step = Int64Builder::with_capacity(n);
    let mut epoch = Int64Builder::with_capacity(n);
    let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut loss = Float64Builder::with_capacity(n);
    let mut loss_per_mask = ListBuilder::new(Float64Builder::new()).with_field(f64_item());
    let mut lr = Float64Builder::with_capacity(n);
    let mut wd = Float64Builder::with_capacity(n);
    let mut ema = Float64Builder::with_capacity(n);
    let mut egn = Float64Builder::with_capacity(n);
    let mut pgn = Float64Builder::with_capacity(n);
    let mut ctx = ListBuilder::new(Int64Builder::new()).with_field(i64_item());
    let mut tgt = ListBuilder::new(Int64Builder::new()).with_field(i64_item());
    let mut cps = Float64Builder::with_capacity(n);
    let mut st = Float64Builder::with_capacity(n);
    let mut dw = Float64Builder::with_capacity(n);
    let mut br = Int64Builder::with_capacity(n);
    let mut ds = Float64Builder::with_capacity(n);
    let mut ts = Float64Builder::with_capacity(n);
    let mut tr = Float64Builder::with_capacity(n);
    let mut pd = UInt64Builder::with_capacity(n);
    let mut nv = Int64Builder::with_capacity(n);
    for r in rows {
        step.append_value(u64_to_i64(r.step));
        epoch.append_value(u64_to_i64(r.epoch));
        time.append_value(r.time_unix_us);
        loss.append_value(r.loss);
        loss_per_mask.values().append_slice(&r.loss_per_mask);
        loss_per_mask.append(true);
        lr.append_value(r.lr);
        wd.append_value(r.weight_decay);
        ema.append_value(r.ema_momentum);
        egn.append_value(r.encoder_grad_norm);
        pgn.append_value(r.predictor_grad_norm);
        ctx.values().append_slice(&r.context_tokens);
        ctx.append(true);
        tgt.values().append_slice(&r.target_tokens);
        tgt.append(true);
        cps.append_value(r.clips_per_sec);
        st.append_value(r.step_time_s);
        dw.append_value(r.data_wait_s);
        br.append_value(u64_to_i64(r.bytes_read));
        ds.append_value(r.decode_s);
        ts.append_value(r.target_std);
        tr.append_value(r.target_rank);
        pd.append_value(r.params_digest);
        nv.append_value(u64_to_i64(r.nvdec_clips));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(step.finish()),
        Arc::new(epoch.finish()),
        Arc::new(time.finish()),
        Arc::new(loss.finish()),
        Arc::new(loss_per_mask.finish()),
        Arc::new(lr.finish()),
        Arc::new(wd.finish()),
        Arc::new(ema.finish()),
        Arc::new(egn.finish()),
        Arc::new(pgn.finish()),
        Arc::new(ctx.finish()),
        Arc::new(tgt.finish()),
        Arc::new(cps.finish()),
        Arc::new(st.finish()),
        Arc::new(dw.finish()),
        Arc::new(br.finish()),
        Arc::new(ds.finish()),
        Arc::new(ts.finish()),
        Arc::new(tr.finish()),
        Arc::new(pd.finish()),
        Arc::new(nv.finish()),
    ];
    RecordBatch::try_new(metrics_schema(), columns)
}

fn quarantine_batch(rows: &[QuarantineRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let mut uri = StringBuilder::with_capacity(n, 64 * n);
    let mut reason = StringBuilder::with_capacity(n, 16 * n);
    let mut detail = StringBuilder::with_capacity(n, 64 * n);
    let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut version = StringBuilder::with_capacity(n, 40 * n);
    for r in rows {
        uri.append_value(&r.uri);
        reason.append_value(&r.reason);
        detail.append_value(&r.detail);
        time.append_value(r.time_unix_us);
        version.append_option(r.object_version.as_deref());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(uri.finish()),
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(time.finish()),
        Arc::new(version.finish()),
    ];
    RecordBatch::try_new(quarantine_schema(), columns)
}

fn clips_batch(rows: &[ClipRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let mut step = Int64Builder::with_capacity(n);
    let mut slot = Int64Builder::with_capacity(n);
    let mut uri = StringBuilder::with_capacity(n, 64 * n);
    let mut frames = ListBuilder::new(Int64Builder::new()).with_field(i64_item());
    let mut crop: [Int64Builder; 4] = std::array::from_fn(|_| Int64Builder::with_capacity(n));
    let mut flip = BooleanBuilder::with_capacity(n);
    for r in rows {
        step.append_value(u64_to_i64(r.step));
        slot.append_value(u64_to_i64(r.slot));
        uri.append_value(&r.uri);
        frames.values().append_slice(&r.frames);
        frames.append(true);
        for (b, v) in crop.iter_mut().zip(r.crop) {
            b.append_value(v);
        }
        flip.append_value(r.flip);
    }
    let [mut top, mut left, mut height, mut width] = crop;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(step.finish()),
        Arc::new(slot.finish()),
        Arc::new(uri.finish()),
        Arc::new(frames.finish()),
        Arc::new(top.finish()),
        Arc::new(left.finish()),
        Arc::new(height.finish()),
        Arc::new(width.finish()),
        Arc::new(flip.finish()),
    ];
    RecordBatch::try_new(clips_schema(), columns)
}

/// A Parquet file being written to a store, one row group per `write_rows`.
pub(crate) struct TableSink {
    writer: AsyncArrowWriter<BufWriter>,
    store: Store,
    uri: String,
    rows: u64,
    schema: SchemaRef,
}

impl TableSink {
    pub(crate) fn create(
        store: &Store,
        rel: &str,
        schema: SchemaRef,
    ) -> Result<Self, StorageError> {
        let path = store.path_of(rel)?;
        let uri = store.uri_of(rel);
        let (os, _) = store.inner();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let writer =
            AsyncArrowWriter::try_new(BufWriter::new(os, path), schema.clone(), Some(props))
                .map_err(|e| StorageError::Parquet {
                    uri: uri.clone(),
                    detail: store.scrub(&error_chain(&e)),
                })?;
        tracing::info!(uri = %uri, "parquet table created");
        Ok(TableSink {
            writer,
            store: store.clone(),
            uri,
            rows: 0,
            schema,
        })
    }

    pub(crate) fn err(&self, what: &str, e: &(dyn std::error::Error + 'static)) -> StorageError {
        StorageError::Parquet {
            uri: self.uri.clone(),
            detail: format!("{what}: {}", self.store.scrub(&error_chain(e))),
        }
    }

    /// Writes `batch` and closes its row group.
    pub(crate) async fn write_rows(&mut self, batch: RecordBatch) -> Result<(), StorageError> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        self.writer
            .write(&batch)
            .await
            .map_err(|e| self.err("write", &e))?;
        self.writer
            .flush()
            .await
            .map_err(|e| self.err("flush", &e))?;
        self.rows += n as u64;
        tracing::debug!(uri = %self.uri, rows = n, total = self.rows, "row group flushed");
        Ok(())
    }

    /// Completes this file and goes on in a new one at `rel` (same store and schema); returns
    /// the rows of the completed file.
    pub(crate) async fn roll(&mut self, rel: &str) -> Result<u64, StorageError> {
        let next = TableSink::create(&self.store, rel, self.schema.clone())?;
        std::mem::replace(self, next).close().await
    }

    pub(crate) async fn close(mut self) -> Result<u64, StorageError> {
        self.writer
            .finish()
            .await
            .map_err(|e| self.err("close", &e))?;
        tracing::info!(uri = %self.uri, rows = self.rows, "parquet table closed");
        Ok(self.rows)
    }
}

/// A row type of one of our tables: its schema and how rows become a record batch.
pub trait TableRow: Sized {
    /// Arrow schema of the table.
    fn schema() -> SchemaRef;
    /// The rows as one record batch of [`Self::schema`].
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError>;
}

impl TableRow for MetricsRow {
    fn schema() -> SchemaRef {
        metrics_schema()
    }
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        metrics_batch(rows)
    }
}

impl TableRow for QuarantineRow {
    fn schema() -> SchemaRef {
        quarantine_schema()
    }
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        quarantine_batch(rows)
    }
}

impl TableRow for ClipRow {
    fn schema() -> SchemaRef {
        clips_schema()
    }
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        clips_batch(rows)
    }
}

/// Writes one table, buffering rows and writing each flush as a row group.
pub struct TableWriter<R: TableRow> {
    sink: TableSink,
    buf: Vec<R>,
}

/// Writes the metrics table (`metrics_schema`).
pub type MetricsWriter = TableWriter<MetricsRow>;
/// Writes the quarantine table (`quarantine_schema`).
pub type QuarantineWriter = TableWriter<QuarantineRow>;
/// Writes the clips table (`clips_schema`).
pub type ClipsWriter = TableWriter<ClipRow>;

impl<R: TableRow> TableWriter<R> {
    /// Starts a file at `rel` in `store` (replaced on close if it exists).
    pub async fn create(store: &Store, rel: &str) -> Result<Self, StorageError> {
        Ok(TableWriter {
            sink: TableSink::create(store, rel, R::schema())?,
            buf: Vec::new(),
        })
    }

    /// Buffers one row (written at the next `flush` or `close`).
    pub fn push(&mut self, row: R) {
        self.buf.push(row);
    }

    /// Rows buffered and not yet flushed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes the buffered rows as one row group (no-op when nothing is buffered).
    pub async fn flush(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let batch = R::to_batch(&self.buf).map_err(|e| self.sink.err("build batch", &e))?;
        self.sink.write_rows(batch).await?;
        self.buf.clear();
        Ok(())
    }

    /// Flushes and completes the file; returns the number of rows written.
    pub async fn close(mut self) -> Result<u64, StorageError> {
        self.flush().await?;
        self.sink.close().await
    }

    /// Flushes, completes the file (readable from now on, whatever happens to the process)
    /// and continues in a new file at `rel`; returns the rows of the completed file. The job
    /// rolls its tables at every checkpoint, so a killed run loses only rows that its resumed
    /// run writes again.
    pub async fn roll(&mut self, rel: &str) -> Result<u64, StorageError> {
        self.flush().await?;
        self.sink.roll(rel).await
    }
}

/// Reads a table's bytes and checks its schema (names and types, in order) against `expected`.
pub(crate) async fn read_batches(
    store: &Store,
    rel: &str,
    expected: &SchemaRef,
    added: &[&str],
) -> Result<Vec<RecordBatch>, StorageError> {
    let uri = store.uri_of(rel);
    let bytes: Bytes = store.get(rel).await?;
    let perr = |what: &str, e: &(dyn std::error::Error + 'static)| StorageError::Parquet {
        uri: uri.clone(),
        detail: format!("{what}: {}", error_chain(e)),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| perr("not a readable parquet file", &e))?;
    check_schema(&uri, builder.schema(), expected, added)?;
    let reader = builder.build().map_err(|e| perr("reader", &e))?;
    let mut out = Vec::new();
    for batch in reader {
        out.push(batch.map_err(|e| perr("decode", &e))?);
    }
    Ok(out)
}

/// `found` must be `expected`, column for column, except that columns named in `added` (added
/// to the schema later) may be missing.
fn check_schema(
    uri: &str,
    found: &Schema,
    expected: &Schema,
    added: &[&str],
) -> Result<(), StorageError> {
    let f: Vec<(&str, &DataType)> = found
        .fields()
        .iter()
        .map(|x| (x.name().as_str(), x.data_type()))
        .collect();
    let present = |name: &str| f.iter().any(|(n, _)| *n == name);
    let e: Vec<(&str, &DataType)> = expected
        .fields()
        .iter()
        .map(|x| (x.name().as_str(), x.data_type()))
        .filter(|(name, _)| !added.contains(name) || present(name))
        .collect();
    let same = f.len() == e.len()
        && f.iter()
            .zip(&e)
            .all(|((fn_, ft), (en, et))| fn_ == en && ft.equals_datatype(et));
    if same {
        Ok(())
    } else {
        Err(StorageError::Schema {
            uri: uri.to_string(),
            detail: format!("found {f:?}, expected {e:?}"),
        })
    }
}

pub(crate) fn schema_err(uri: &str, col: &str, what: &str) -> StorageError {
    StorageError::Schema {
        uri: uri.to_string(),
        detail: format!("column {col}: {what}"),
    }
}

pub(crate) fn col<'a>(
    uri: &str,
    b: &'a RecordBatch,
    name: &str,
) -> Result<&'a ArrayRef, StorageError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| schema_err(uri, name, "missing"))?;
    if c.null_count() > 0 {
        return Err(schema_err(uri, name, "has nulls"));
    }
    Ok(c)
}

pub(crate) fn i64_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<i64>, StorageError> {
    let a = col(uri, b, name)?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| schema_err(uri, name, "not int64"))?;
    Ok(a.values().to_vec())
}

fn u64_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<u64>, StorageError> {
    let a = col(uri, b, name)?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| schema_err(uri, name, "not uint64"))?;
    Ok(a.values().to_vec())
}

fn f64_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<f64>, StorageError> {
    let a = col(uri, b, name)?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| schema_err(uri, name, "not float64"))?;
    Ok(a.values().to_vec())
}

fn ts_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<i64>, StorageError> {
    let a = col(uri, b, name)?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(uri, name, "not timestamp[us]"))?;
    Ok(a.values().to_vec())
}

fn opt_str_col(
    uri: &str,
    b: &RecordBatch,
    name: &str,
) -> Result<Vec<Option<String>>, StorageError> {
    // Not `col`: nulls are this column's "unknown".
    let a = b
        .column_by_name(name)
        .ok_or_else(|| schema_err(uri, name, "missing"))?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(uri, name, "not utf8"))?;
    Ok(a.iter().map(|v| v.map(str::to_string)).collect())
}

pub(crate) fn str_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<String>, StorageError> {
    let a = col(uri, b, name)?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(uri, name, "not utf8"))?;
    Ok(a.iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect())
}

fn f64_list_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<Vec<f64>>, StorageError> {
    let l = col(uri, b, name)?
        .as_list_opt::<i32>()
        .ok_or_else(|| schema_err(uri, name, "not a list"))?;
    let mut out = Vec::with_capacity(l.len());
    for i in 0..l.len() {
        let v = l.value(i);
        let p = v
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| schema_err(uri, name, "items not float64"))?;
        out.push(p.values().to_vec());
    }
    Ok(out)
}

pub(crate) fn i64_list_col(
    uri: &str,
    b: &RecordBatch,
    name: &str,
) -> Result<Vec<Vec<i64>>, StorageError> {
    let l = col(uri, b, name)?
        .as_list_opt::<i32>()
        .ok_or_else(|| schema_err(uri, name, "not a list"))?;
    let mut out = Vec::with_capacity(l.len());
    for i in 0..l.len() {
        let v = l.value(i);
        let p = v
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| schema_err(uri, name, "items not int64"))?;
        out.push(p.values().to_vec());
    }
    Ok(out)
}

fn i64_to_u64(uri: &str, name: &str, v: i64) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| schema_err(uri, name, &format!("negative value {v}")))
}

/// The files of the table `name` in `store`, in order: `{name}.parquet` (a run from step 0), then
/// `{name}-from-{N}.parquet` by N (a run resumed from checkpoint N, or the table rolled at
/// checkpoint N). Together they are the table.
pub async fn table_files(store: &Store, name: &str) -> Result<Vec<String>, StorageError> {
    let mut found: Vec<(u64, String)> = Vec::new();
    for o in store.list().await? {
        if let Some(n) = table_file_step(name, &o.path) {
            found.push((n, o.path));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The step a file of the table `name` starts after: 0 for `{name}.parquet`, N for
/// `{name}-from-{N}.parquet`; `None` for any other object.
pub fn table_file_step(name: &str, file: &str) -> Option<u64> {
    if file == format!("{name}.parquet") {
        return Some(0);
    }
    file.strip_prefix(name)?
        .strip_prefix("-from-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// All rows of the metrics table across its files ([`table_files`]), one per step, by step; for
/// a step found in several files (a run resumed from an older checkpoint) the later file wins.
pub async fn read_metrics_all(store: &Store) -> Result<Vec<MetricsRow>, StorageError> {
    let mut by_step = std::collections::BTreeMap::new();
    for f in table_files(store, "metrics").await? {
        for r in read_metrics(store, &f).await? {
            by_step.insert(r.step, r);
        }
    }
    Ok(by_step.into_values().collect())
}

/// All rows of the quarantine table across its files, in file order.
pub async fn read_quarantine_all(store: &Store) -> Result<Vec<QuarantineRow>, StorageError> {
    let mut out = Vec::new();
    for f in table_files(store, "quarantine").await? {
        out.extend(read_quarantine(store, &f).await?);
    }
    Ok(out)
}

/// The quarantine records a run resumed at `step` inherits: those of the table's files that
/// start before it (it writes the files from there on; a file that starts before it may also
/// hold records of later steps, found by loads ahead of training), file by file, each with its
/// own result so that one unreadable file does not hide the others.
pub async fn read_quarantine_before(
    store: &Store,
    step: u64,
) -> Vec<(String, Result<Vec<QuarantineRow>, StorageError>)> {
    let files = match table_files(store, "quarantine").await {
        Ok(f) => f,
        Err(e) => return vec![("quarantine*.parquet".into(), Err(e))],
    };
    let mut out = Vec::new();
    for f in files {
        if table_file_step("quarantine", &f).is_some_and(|s| s < step) {
            let rows = read_quarantine(store, &f).await;
            out.push((f, rows));
        }
    }
    out
}

/// All rows of the clips table across its files, one per (step, slot), by (step, slot); the
/// later file wins.
pub async fn read_clips_all(store: &Store) -> Result<Vec<ClipRow>, StorageError> {
    let mut by_key = std::collections::BTreeMap::new();
    for f in table_files(store, "clips").await? {
        for r in read_clips(store, &f).await? {
            by_key.insert((r.step, r.slot), r);
        }
    }
    Ok(by_key.into_values().collect())
}

/// Reads a whole metrics table (tests and tools).
pub async fn read_metrics(store: &Store, rel: &str) -> Result<Vec<MetricsRow>, StorageError> {
    let uri = store.uri_of(rel);
    let mut out = Vec::new();
    for b in read_batches(store, rel, &metrics_schema(), &METRICS_ADDED).await? {
        let u = uri.as_str();
        let step = i64_col(u, &b, "step")?;
        let epoch = i64_col(u, &b, "epoch")?;
        let time = ts_col(u, &b, "time")?;
        let loss = f64_col(u, &b, "loss")?;
        let lpm = f64_list_col(u, &b, "loss_per_mask")?;
        let lr = f64_col(u, &b, "lr")?;
        let wd = f64_col(u, &b, "weight_decay")?;
        let ema = f64_col(u, &b, "ema_momentum")?;
        let egn = f64_col(u, &b, "encoder_grad_norm")?;
        let pgn = f64_col(u, &b, "predictor_grad_norm")?;
        let ctx = i64_list_col(u, &b, "context_tokens")?;
        let tgt = i64_list_col(u, &b, "target_tokens")?;
        let cps = f64_col(u, &b, "clips_per_sec")?;
        let st = f64_col(u, &b, "step_time_s")?;
        let dw = f64_col(u, &b, "data_wait_s")?;
        let br = i64_col(u, &b, "bytes_read")?;
        let ds = f64_col(u, &b, "decode_s")?;
        let ts = f64_col(u, &b, "target_std")?;
        // Tables from before the column existed read as 0.
        let tr = match b.column_by_name("target_rank") {
            Some(_) => f64_col(u, &b, "target_rank")?,
            None => vec![0.0; b.num_rows()],
        };
        let pd = u64_col(u, &b, "params_digest")?;
        let nv = match b.column_by_name("nvdec_clips") {
            Some(_) => i64_col(u, &b, "nvdec_clips")?,
            None => vec![0; b.num_rows()],
        };
        let mut lpm = lpm.into_iter();
        let mut ctx = ctx.into_iter();
        let mut tgt = tgt.into_iter();
        for i in 0..b.num_rows() {
            out.push(MetricsRow {
                step: i64_to_u64(u, "step", step[i])?,
                epoch: i64_to_u64(u, "epoch", epoch[i])?,
                time_unix_us: time[i],
                loss: loss[i],
                loss_per_mask: lpm.next().unwrap_or_default(),
                lr: lr[i],
                weight_decay: wd[i],
                ema_momentum: ema[i],
                encoder_grad_norm: egn[i],
                predictor_grad_norm: pgn[i],
                context_tokens: ctx.next().unwrap_or_default(),
                target_tokens: tgt.next().unwrap_or_default(),
                clips_per_sec: cps[i],
                step_time_s: st[i],
                data_wait_s: dw[i],
                bytes_read: i64_to_u64(u, "bytes_read", br[i])?,
                decode_s: ds[i],
                target_std: ts[i],
                target_rank: tr[i],
                params_digest: pd[i],
                nvdec_clips: i64_to_u64(u, "nvdec_clips", nv[i])?,
            });
        }
    }
    Ok(out)
}

/// Reads a whole quarantine table (tests and tools).
pub async fn read_quarantine(store: &Store, rel: &str) -> Result<Vec<QuarantineRow>, StorageError> {
    let uri = store.uri_of(rel);
    let mut out = Vec::new();
    for b in read_batches(store, rel, &quarantine_schema(), &QUARANTINE_ADDED).await? {
        let u = uri.as_str();
        let uris = str_col(u, &b, "uri")?;
        let reasons = str_col(u, &b, "reason")?;
        let details = str_col(u, &b, "detail")?;
        let times = ts_col(u, &b, "time")?;
        // Tables from before the column existed read as unknown versions.
        let versions = match b.column_by_name("object_version") {
            Some(_) => opt_str_col(u, &b, "object_version")?,
            None => vec![None; b.num_rows()],
        };
        for ((((uri, reason), detail), time_unix_us), object_version) in uris
            .into_iter()
            .zip(reasons)
            .zip(details)
            .zip(times)
            .zip(versions)
        {
            out.push(QuarantineRow {
                uri,
                reason,
                detail,
                time_unix_us,
                object_version,
            });
        }
    }
    Ok(out)
}

/// Reads a whole clips table (tests and tools).
pub async fn read_clips(store: &Store, rel: &str) -> Result<Vec<ClipRow>, StorageError> {
    let uri = store.uri_of(rel);
    let mut out = Vec::new();
    for b in read_batches(store, rel, &clips_schema(), &[]).await? {
        let u = uri.as_str();
        let step = i64_col(u, &b, "step")?;
        let slot = i64_col(u, &b, "slot")?;
        let uris = str_col(u, &b, "uri")?;
        let frames = i64_list_col(u, &b, "frames")?;
        let top = i64_col(u, &b, "crop_top")?;
        let left = i64_col(u, &b, "crop_left")?;
        let height = i64_col(u, &b, "crop_height")?;
        let width = i64_col(u, &b, "crop_width")?;
        let flip = col(u, &b, "flip")?
            .as_boolean_opt()
            .ok_or_else(|| schema_err(u, "flip", "not boolean"))?;
        for (i, (uri, frames)) in uris.into_iter().zip(frames).enumerate() {
            out.push(ClipRow {
                step: i64_to_u64(u, "step", step[i])?,
                slot: i64_to_u64(u, "slot", slot[i])?,
                uri,
                frames,
                crop: [top[i], left[i], height[i], width[i]],
                flip: flip.value(i),
            });
        }
    }
    Ok(out)
}

/// Reads the Arrow schema stored in a Parquet file (tests and tools).
pub async fn read_schema(store: &Store, rel: &str) -> Result<SchemaRef, StorageError> {
    let uri = store.uri_of(rel);
    let bytes = store.get(rel).await?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| StorageError::Parquet {
            uri: uri.clone(),
            detail: format!("not a readable parquet file: {}", error_chain(&e)),
        })?;
    Ok(builder.schema().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_match_schemas() {
        let row = MetricsRow {
            loss_per_mask: vec![1.0, 2.0],
            context_tokens: vec![3],
            target_tokens: vec![],
            ..Default::default()
        };
        let b = metrics_batch(&[row.clone(), row]).unwrap();
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.schema(), metrics_schema());
        let c = clips_batch(&[ClipRow {
            frames: vec![0, 4],
            flip: true,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(c.schema(), clips_schema());
        let q = quarantine_batch(&[]).unwrap();
        assert_eq!(q.num_rows(), 0);
        assert_eq!(q.schema(), quarantine_schema());
    }

    #[tokio::test]
    async fn roll_publishes_the_file_before_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &Default::default(), true).unwrap();
        let mut w = MetricsWriter::create(&store, "metrics.parquet")
            .await
            .unwrap();
        for step in 1..=4 {
            w.push(MetricsRow {
                step,
                ..Default::default()
            });
        }
        assert_eq!(w.roll("metrics-from-00000004.parquet").await.unwrap(), 4);
        w.push(MetricsRow {
            step: 5,
            ..Default::default()
        });
        w.flush().await.unwrap();
        // The process dies here: the rolled file is complete, the open one never appears.
        drop(w);
        let rows = read_metrics(&store, "metrics.parquet").await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.step).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(!store.exists("metrics-from-00000004.parquet").await.unwrap());
        // A resumed run writes the rest; the files read together as one table.
        let mut w = MetricsWriter::create(&store, "metrics-from-00000004.parquet")
            .await
            .unwrap();
        for step in 5..=6 {
            w.push(MetricsRow {
                step,
                ..Default::default()
            });
        }
        w.close().await.unwrap();
        assert_eq!(
            table_files(&store, "metrics").await.unwrap(),
            ["metrics.parquet", "metrics-from-00000004.parquet"]
        );
        let all = read_metrics_all(&store).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.step).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
    }

    /// A run resumed at step N reads the quarantine records of the files before N (those
    /// after are the stopped run's, and it writes its own).
    #[tokio::test]
    async fn quarantine_records_before_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &Default::default(), true).unwrap();
        for (file, uri) in [
            ("quarantine.parquet", "a"),
            ("quarantine-from-00000004.parquet", "b"),
            ("quarantine-from-00000008.parquet", "c"),
        ] {
            let mut w = QuarantineWriter::create(&store, file).await.unwrap();
            w.push(QuarantineRow {
                uri: uri.into(),
                ..Default::default()
            });
            w.close().await.unwrap();
        }
        store
            .put("quarantine-from-x.parquet", bytes::Bytes::from_static(b"?"))
            .await
            .unwrap();
        let uris = |files: Vec<(String, Result<Vec<QuarantineRow>, StorageError>)>| {
            files
                .into_iter()
                .flat_map(|(_, rows)| rows.unwrap())
                .map(|r| r.uri)
                .collect::<Vec<_>>()
        };
        assert_eq!(uris(read_quarantine_before(&store, 8).await), ["a", "b"]);
        assert_eq!(
            uris(read_quarantine_before(&store, 9).await),
            ["a", "b", "c"]
        );
        assert_eq!(
            uris(read_quarantine_before(&store, 0).await),
            Vec::<String>::new()
        );
        assert_eq!(
            table_file_step("quarantine", "quarantine-from-00000008.parquet"),
            Some(8)
        );
        assert_eq!(table_file_step("quarantine", "quarantine.parquet"), Some(0));
        assert_eq!(table_file_step("quarantine", "metrics.parquet"), None);
        assert_eq!(table_file_step("clips", "clips-from-1.parquet.tmp"), None);
    }
}
