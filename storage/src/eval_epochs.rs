//! `epochs.parquet`: one row per epoch of `vjepa probe` / `vjepa finetune` — its train loss and
//! train top-1, and its validation top-1 where the run evaluated after it — the table the
//! official evaluation logs as its per-epoch CSV (train accuracy, validation accuracy), so a
//! user can read the learning curve and see over-fitting, not only the final top-1.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, Int64Builder, RecordBatch, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::tables::{TableRow, ts_type, u64_to_i64};

/// One epoch of an evaluation run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochRow {
    /// 1-based.
    pub epoch: u64,
    /// When the epoch (and its validation, if any) ended, microseconds since the Unix epoch.
    pub time_unix_us: i64,
    /// Mean loss of the epoch's steps.
    pub train_loss: f64,
    /// Train top-1 in %: each batch scored before its update.
    pub train_top1: f64,
    /// Train videos the epoch trained on.
    pub train_videos: u64,
    /// Validation top-1 in % after this epoch; NaN where the run did not evaluate after it.
    pub val_top1: f64,
    /// Validation videos evaluated after this epoch (0 where it did not evaluate).
    pub val_videos: u64,
    /// Seconds the epoch took, its validation included.
    pub seconds: f64,
}

/// Arrow schema of the epochs table (all columns non-null, as the job's tables).
pub fn epochs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::Int64, false),
        Field::new("time", ts_type(), false),
        Field::new("train_loss", DataType::Float64, false),
        Field::new("train_top1", DataType::Float64, false),
        Field::new("train_videos", DataType::Int64, false),
        Field::new("val_top1", DataType::Float64, false),
        Field::new("val_videos", DataType::Int64, false),
        Field::new("seconds", DataType::Float64, false),
    ]))
}

impl TableRow for EpochRow {
    fn schema() -> SchemaRef {
        epochs_schema()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let n = rows.len();
        let mut epoch = Int64Builder::with_capacity(n);
        let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut train_loss = Float64Builder::with_capacity(n);
        let mut train_top1 = Float64Builder::with_capacity(n);
        let mut train_videos = Int64Builder::with_capacity(n);
        let mut val_top1 = Float64Builder::with_capacity(n);
        let mut val_videos = Int64Builder::with_capacity(n);
        let mut seconds = Float64Builder::with_capacity(n);
        for r in rows {
            epoch.append_value(u64_to_i64(r.epoch));
            time.append_value(r.time_unix_us);
            train_loss.append_value(r.train_loss);
            train_top1.append_value(r.train_top1);
            train_videos.append_value(u64_to_i64(r.train_videos));
            val_top1.append_value(r.val_top1);
            val_videos.append_value(u64_to_i64(r.val_videos));
            seconds.append_value(r.seconds);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(epoch.finish()),
            Arc::new(time.finish()),
            Arc::new(train_loss.finish()),
            Arc::new(train_top1.finish()),
            Arc::new(train_videos.finish()),
            Arc::new(val_top1.finish()),
            Arc::new(val_videos.finish()),
            Arc::new(seconds.finish()),
        ];
        RecordBatch::try_new(epochs_schema(), columns)
    }
}

/// Reads an epochs table written by [`crate::predictions::write_file`] (a run continuing
/// after a stop keeps the rows of the epochs it already did).
pub fn read_file(path: &std::path::Path) -> Result<Vec<EpochRow>, crate::StorageError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
    let err = |detail: String| crate::StorageError::Parquet {
        uri: path.display().to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| err(format!("open: {e}")))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(format!("read: {e}")))?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| err(format!("read: {e}")))?;
        if b.schema() != epochs_schema() {
            return Err(err("not an epochs table".into()));
        }
        let int = |i: usize| b.column(i).as_primitive::<Int64Type>();
        let float = |i: usize| b.column(i).as_primitive::<Float64Type>();
        let time = b.column(1).as_primitive::<TimestampMicrosecondType>();
        for r in 0..b.num_rows() {
            if (0..b.num_columns()).any(|c| b.column(c).is_null(r)) {
                return Err(err(format!("row {r} has a null")));
            }
            rows.push(EpochRow {
                epoch: int(0).value(r).max(0) as u64,
                time_unix_us: time.value(r),
                train_loss: float(2).value(r),
                train_top1: float(3).value(r),
                train_videos: int(4).value(r).max(0) as u64,
                val_top1: float(5).value(r),
                val_videos: int(6).value(r).max(0) as u64,
                seconds: float(7).value(r),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictions::write_file;
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn read(path: &std::path::Path) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&epochs_schema(), &batches).unwrap()
    }

    #[test]
    fn epochs_round_trip_and_a_rewrite_replaces_the_table_whole() {
        let row = |epoch: u64, val: Option<(f64, u64)>| EpochRow {
            epoch,
            time_unix_us: 1_700_000_000_000_000 + epoch as i64,
            train_loss: 1.0 / epoch as f64,
            train_top1: 10.0 * epoch as f64,
            train_videos: 40,
            val_top1: val.map_or(f64::NAN, |v| v.0),
            val_videos: val.map_or(0, |v| v.1),
            seconds: 2.5,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epochs.parquet");
        let mut rows = vec![row(1, None)];
        write_file(&path, &rows).unwrap();
        assert_eq!(read(&path).num_rows(), 1);
        rows.push(row(2, Some((62.5, 16))));
        write_file(&path, &rows).unwrap();
        let b = read(&path);
        assert_eq!(b.schema(), epochs_schema());
        assert_eq!(b.num_rows(), 2);
        let epochs = b.column(0).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(epochs, vec![1, 2]);
        let val = b.column(5).as_primitive::<Float64Type>();
        assert!(val.value(0).is_nan());
        assert_eq!(val.value(1), 62.5);
        assert_eq!(b.column(6).as_primitive::<Int64Type>().value(1), 16);
        let back = read_file(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1], rows[1]);
        assert!(back[0].val_top1.is_nan() && back[0].epoch == 1);
        assert!(read_file(&dir.path().join("none.parquet")).is_err());
        // Nothing is left beside the table.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("epochs.parquet")]);
        // A failed write leaves no staging file either (the folder does not exist).
        assert!(write_file(&dir.path().join("missing/epochs.parquet"), &rows).is_err());
    }
}
