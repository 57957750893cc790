//! The features table: one row per (video, segment, view) clip encoded by a frozen encoder
//! (`vjepa extract`, and `outputs.features` while training). It is how a corpus gets its
//! embedding table; all columns are non-null so pandas, pyarrow and duckdb read it as is.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};

use crate::tables::{
    TableRow, TableWriter, col, f32_item, i64_col, i64_item, i64_list_col, read_batches,
    schema_err, str_col, u64_to_i64,
};
use crate::{StorageError, Store};

/// One encoded clip.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureRow {
    /// The video's full URI (no credentials).
    pub uri: String,
    /// The index's label column as written ("" when the dataset has none).
    pub label: String,
    /// Temporal segment of the video (0-based).
    pub segment: u64,
    /// Spatial view of the segment (0-based).
    pub view: u64,
    /// Training step that produced the row (0 for `vjepa extract`).
    pub step: u64,
    /// Source frame numbers of the clip (the first is its start frame).
    pub frames: Vec<i64>,
    /// Mean over tokens of the encoder's output, `D` values.
    pub embedding: Vec<f32>,
    /// Every token's output, `N × D` row-major, when requested; else empty.
    pub tokens: Vec<f32>,
}

/// Arrow schema of the features table.
pub fn features_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uri", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("segment", DataType::Int64, false),
        Field::new("view", DataType::Int64, false),
        Field::new("step", DataType::Int64, false),
        Field::new("start_frame", DataType::Int64, false),
        Field::new("frames", DataType::List(i64_item()), false),
        Field::new("embedding", DataType::List(f32_item()), false),
        Field::new("tokens", DataType::List(f32_item()), false),
    ]))
}

fn features_batch(rows: &[FeatureRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let mut uri = StringBuilder::with_capacity(n, 64 * n);
    let mut label = StringBuilder::with_capacity(n, 8 * n);
    let mut segment = Int64Builder::with_capacity(n);
    let mut view = Int64Builder::with_capacity(n);
    let mut step = Int64Builder::with_capacity(n);
    let mut start = Int64Builder::with_capacity(n);
    let mut frames = ListBuilder::new(Int64Builder::new()).with_field(i64_item());
    let mut embedding = ListBuilder::new(Float32Builder::new()).with_field(f32_item());
    let mut tokens = ListBuilder::new(Float32Builder::new()).with_field(f32_item());
    for r in rows {
        uri.append_value(&r.uri);
        label.append_value(&r.label);
        segment.append_value(u64_to_i64(r.segment));
        view.append_value(u64_to_i64(r.view));
        step.append_value(u64_to_i64(r.step));
        start.append_value(r.frames.first().copied().unwrap_or(0));
        frames.values().append_slice(&r.frames);
        frames.append(true);
        embedding.values().append_slice(&r.embedding);
        embedding.append(true);
        tokens.values().append_slice(&r.tokens);
        tokens.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(uri.finish()),
        Arc::new(label.finish()),
        Arc::new(segment.finish()),
        Arc::new(view.finish()),
        Arc::new(step.finish()),
        Arc::new(start.finish()),
        Arc::new(frames.finish()),
        Arc::new(embedding.finish()),
        Arc::new(tokens.finish()),
    ];
    RecordBatch::try_new(features_schema(), columns)
}

impl TableRow for FeatureRow {
    fn schema() -> SchemaRef {
        features_schema()
    }
    fn to_batch(rows: &[Self]) -> Result<RecordBatch, arrow::error::ArrowError> {
        features_batch(rows)
    }
}

/// Writes the features table (`features_schema`).
pub type FeaturesWriter = TableWriter<FeatureRow>;

/// All rows of a training run's features table `name` (`outputs.features`) across its files
/// ([`crate::tables::table_files`]), by step; for a step found in several files (a run resumed
/// from an older checkpoint trains it again) the later file's rows win.
pub async fn read_features_all(store: &Store, name: &str) -> Result<Vec<FeatureRow>, StorageError> {
    let mut by_step: std::collections::BTreeMap<u64, Vec<FeatureRow>> = Default::default();
    for f in crate::tables::table_files(store, name).await? {
        let mut file: std::collections::BTreeMap<u64, Vec<FeatureRow>> = Default::default();
        for r in read_features(store, &f).await? {
            file.entry(r.step).or_default().push(r);
        }
        by_step.extend(file);
    }
    Ok(by_step.into_values().flatten().collect())
}

fn f32_list_col(uri: &str, b: &RecordBatch, name: &str) -> Result<Vec<Vec<f32>>, StorageError> {
    let l = col(uri, b, name)?
        .as_list_opt::<i32>()
        .ok_or_else(|| schema_err(uri, name, "not a list"))?;
    let mut out = Vec::with_capacity(l.len());
    for i in 0..l.len() {
        let v = l.value(i);
        let p = v
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| schema_err(uri, name, "items not float32"))?;
        out.push(p.values().to_vec());
    }
    Ok(out)
}

/// Reads a whole features table (tests and tools).
pub async fn read_features(store: &Store, rel: &str) -> Result<Vec<FeatureRow>, StorageError> {
    let uri = store.uri_of(rel);
    let u = uri.as_str();
    let mut out = Vec::new();
    for b in read_batches(store, rel, &features_schema(), &[]).await? {
        let uris = str_col(u, &b, "uri")?;
        let labels = str_col(u, &b, "label")?;
        let segment = i64_col(u, &b, "segment")?;
        let view = i64_col(u, &b, "view")?;
        let step = i64_col(u, &b, "step")?;
        let frames = i64_list_col(u, &b, "frames")?;
        let embedding = f32_list_col(u, &b, "embedding")?;
        let tokens = f32_list_col(u, &b, "tokens")?;
        for (i, (((uri, label), frames), (embedding, tokens))) in uris
            .into_iter()
            .zip(labels)
            .zip(frames)
            .zip(embedding.into_iter().zip(tokens))
            .enumerate()
        {
            out.push(FeatureRow {
                uri,
                label,
                segment: segment[i].max(0) as u64,
                view: view[i].max(0) as u64,
                step: step[i].max(0) as u64,
                frames,
                embedding,
                tokens,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &Default::default(), true).unwrap();
        let mut w = FeaturesWriter::create(&store, "f.parquet").await.unwrap();
        let row = FeatureRow {
            uri: "file:///v.mp4".into(),
            label: "3".into(),
            segment: 1,
            view: 2,
            step: 0,
            frames: vec![5, 9],
            embedding: vec![0.5, -1.0],
            tokens: vec![],
        };
        w.push(row.clone());
        w.flush().await.unwrap();
        w.push(FeatureRow {
            tokens: vec![1.0; 4],
            ..row.clone()
        });
        assert_eq!(w.close().await.unwrap(), 2);
        let back = read_features(&store, "f.parquet").await.unwrap();
        assert_eq!(back[0], row);
        assert_eq!(back[1].tokens.len(), 4);
        assert_eq!(
            crate::tables::read_schema(&store, "f.parquet")
                .await
                .unwrap(),
            features_schema()
        );
    }
}
