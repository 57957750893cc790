//! `predictions.parquet`: one row per evaluated video of `vjepa probe` / `vjepa finetune` — its
//! true and predicted class and the class probabilities — so a user can read the confusion,
//! the hard videos and the calibration, not only the top-1.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float32Builder, ListBuilder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::StorageError;
use crate::error::error_chain;
use crate::tables::{TableRow, f32_item};

/// One evaluated video.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionRow {
    /// Full URI of the video.
    pub uri: String,
    /// Its class, by name.
    pub label: String,
    /// The class with the highest probability.
    pub predicted: String,
    /// `predicted == label`.
    pub correct: bool,
    /// One probability per class, in class order (averaged over views).
    pub probabilities: Vec<f32>,
}

impl PredictionRow {
    /// The row of a video whose true class is `label` (index into `classes`), from its class
    /// probabilities: the prediction is the most probable class (the first on ties).
    pub fn new(uri: String, label: usize, probabilities: Vec<f32>, classes: &[String]) -> Self {
        let best = probabilities
            .iter()
            .enumerate()
            .fold(None, |best: Option<(usize, f32)>, (i, &p)| match best {
                Some((_, b)) if b >= p => best,
                _ => Some((i, p)),
            })
            .map_or(0, |(i, _)| i);
        let name = |i: usize| classes.get(i).cloned().unwrap_or_default();
        PredictionRow {
            uri,
            label: name(label),
            predicted: name(best),
            correct: best == label,
            probabilities,
        }
    }
}

/// Arrow schema of the predictions table.
pub fn predictions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uri", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("predicted", DataType::Utf8, false),
        Field::new("correct", DataType::Boolean, false),
        Field::new("probabilities", DataType::List(f32_item()), false),
    ]))
}

impl TableRow for PredictionRow {
    fn schema() -> SchemaRef {
        predictions_schema()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut uri = StringBuilder::new();
        let mut label = StringBuilder::new();
        let mut predicted = StringBuilder::new();
        let mut correct = BooleanBuilder::new();
        let mut probs = ListBuilder::new(Float32Builder::new()).with_field(f32_item());
        for r in rows {
            uri.append_value(&r.uri);
            label.append_value(&r.label);
            predicted.append_value(&r.predicted);
            correct.append_value(r.correct);
            probs.values().append_slice(&r.probabilities);
            probs.append(true);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(uri.finish()),
            Arc::new(label.finish()),
            Arc::new(predicted.finish()),
            Arc::new(correct.finish()),
            Arc::new(probs.finish()),
        ];
        RecordBatch::try_new(predictions_schema(), columns)
    }
}

/// Writes `rows` as one local Parquet file at `path` (zstd, like the job's tables), through
/// [`crate::replace_local_file`]: tables rewritten as a run goes (the evaluation's
/// `epochs.parquet`) stay readable while it runs.
pub fn write_file<R: TableRow>(path: &Path, rows: &[R]) -> Result<(), StorageError> {
    let err = |what: &str, e: &(dyn std::error::Error + 'static)| StorageError::Parquet {
        uri: path.display().to_string(),
        detail: format!("{what}: {}", error_chain(e)),
    };
    let batch = R::to_batch(rows).map_err(|e| err("build batch", &e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut w =
        ArrowWriter::try_new(Vec::new(), R::schema(), Some(props)).map_err(|e| err("open", &e))?;
    w.write(&batch).map_err(|e| err("write", &e))?;
    let bytes = w.into_inner().map_err(|e| err("close", &e))?;
    crate::replace_local_file(path, &bytes).map_err(|e| err("write", &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::Float32Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn rows_predict_the_most_probable_class_and_round_trip() {
        let classes: Vec<String> = ["left", "right", "zoom"].map(String::from).to_vec();
        let rows = vec![
            PredictionRow::new("s3://b/a.mp4".into(), 1, vec![0.1, 0.7, 0.2], &classes),
            PredictionRow::new("s3://b/b.mp4".into(), 0, vec![0.3, 0.3, 0.4], &classes),
            // A tie goes to the first class.
            PredictionRow::new("s3://b/c.mp4".into(), 0, vec![0.5, 0.5, 0.0], &classes),
        ];
        assert_eq!(
            rows.iter()
                .map(|r| (r.predicted.as_str(), r.correct))
                .collect::<Vec<_>>(),
            [("right", true), ("zoom", false), ("left", true)]
        );
        assert_eq!(rows[1].label, "left");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.parquet");
        write_file(&path, &rows).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.schema(), predictions_schema());
        assert_eq!(b.num_rows(), 3);
        let probs = b.column(4).as_list::<i32>();
        let second = probs.value(1);
        assert_eq!(
            second.as_primitive::<Float32Type>().values().to_vec(),
            vec![0.3, 0.3, 0.4]
        );
        assert!(write_file(&dir.path().join("missing/x.parquet"), &rows).is_err());
    }
}
