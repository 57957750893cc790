//! Datasets: index resolution (accepted vs rejected entries) and prefix listing.

use bytes::Bytes;
use vjepa_storage::dataset::{self, DatasetEntry};
use vjepa_storage::{S3Settings, StorageError, Store};

fn s3() -> S3Settings {
    S3Settings::default()
}

async fn make_tree(root: &std::path::Path) {
    let store = Store::open(root.to_str().unwrap(), &s3(), true).unwrap();
    for rel in [
        "v1.mp4",
        "sub/v2.MOV",
        "sub/deeper/v3.webm",
        "readme.txt",
        "sub/frames.npy",
    ] {
        store
            .put(rel, Bytes::from_static(b"not really a video"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn index_entries_accepted_and_rejected() {
    let parent = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(parent.path()).unwrap().join("data");
    make_tree(&root).await;
    std::fs::write(parent.path().join("outside.mp4"), b"x").unwrap();
    let abs = root.display().to_string();
    let index = format!(
        "v1.mp4 0\n\
         ./sub/v2.MOV 1\n\
         \n\
         {abs}/sub/deeper/v3.webm 2\n\
         file://{abs}/v1.mp4\n\
         sub/../v1.mp4 4 extra fields here\n\
         ../outside.mp4 5\n\
         /etc/passwd\n\
         s3://other/x.mp4 6\n\
         http://x\n\
         {abs}/../outside.mp4\n\
         sub/..\n"
    );
    std::fs::write(root.join("index.csv"), index).unwrap();

    let spec = format!("{abs}/index.csv");
    let ds = dataset::open(&spec, &s3()).await.unwrap();
    assert_eq!(ds.name, spec);
    assert_eq!(ds.store.url(), format!("file://{abs}/"));
    let e = |rel: &str, label: Option<&str>| DatasetEntry {
        rel: rel.into(),
        label: label.map(str::to_string),
        tag: None,
    };
    assert_eq!(
        ds.entries,
        vec![
            e("v1.mp4", Some("0")),
            e("sub/v2.MOV", Some("1")),
            e("sub/deeper/v3.webm", Some("2")),
            e("v1.mp4", None),
            e("v1.mp4", Some("4")),
        ]
    );
    let got: Vec<(&str, &str)> = ds
        .rejected
        .iter()
        .map(|r| (r.entry.as_str(), r.reason.as_str()))
        .collect();
    let outside_abs = format!("{abs}/../outside.mp4");
    assert_eq!(
        got,
        vec![
            ("../outside.mp4", "path_escapes_store"),
            ("/etc/passwd", "path_escapes_store"),
            ("s3://other/x.mp4", "path_escapes_store"),
            ("http://x", "unsupported_scheme"),
            (outside_abs.as_str(), "path_escapes_store"),
            ("sub/..", "invalid_path"),
        ]
    );
    assert!(
        ds.rejected[0].detail.starts_with("line 7:"),
        "{}",
        ds.rejected[0].detail
    );
    // Every accepted entry is readable through the dataset's store.
    for entry in &ds.entries {
        ds.store.get(&entry.rel).await.unwrap();
        assert!(ds.uri_of(entry).starts_with(ds.store.url()));
    }
}

#[tokio::test]
async fn relative_and_url_specs() {
    let parent = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(parent.path()).unwrap().join("d");
    make_tree(&root).await;
    std::fs::write(root.join("list.txt"), "sub/v2.MOV\n").unwrap();
    let url_spec = format!("file://{}/list.txt", root.display());
    let ds = dataset::open(&url_spec, &s3()).await.unwrap();
    assert_eq!(ds.entries.len(), 1);
    assert!(ds.rejected.is_empty());
}

#[tokio::test]
async fn prefix_listing_filters_extensions() {
    let parent = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(parent.path()).unwrap().join("videos");
    make_tree(&root).await;
    let expected = ["sub/deeper/v3.webm", "sub/v2.MOV", "v1.mp4"];
    for spec in [format!("{}/", root.display()), root.display().to_string()] {
        let ds = dataset::open(&spec, &s3()).await.unwrap();
        let rels: Vec<&str> = ds.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, expected, "{spec}");
        // A listed entry carries the object version the store gives it.
        for e in &ds.entries {
            assert!(e.label.is_none());
            assert_eq!(e.tag, ds.store.head(&e.rel).await.unwrap().tag, "{}", e.rel);
            assert!(e.tag.is_some());
        }
        assert!(ds.rejected.is_empty());
    }
}

#[tokio::test]
async fn index_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.csv");
    let err = dataset::open(missing.to_str().unwrap(), &s3())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    // A prefix given without its '/' reads as an index: the error says how to list it.
    assert!(err.to_string().contains("end it with '/'"), "{err}");

    let bin = dir.path().join("bin.csv");
    std::fs::write(&bin, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let err = dataset::open(bin.to_str().unwrap(), &s3())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::IndexNotText { .. }), "{err}");

    let err = dataset::open("ftp://host/index.csv", &s3())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::UnsupportedScheme { .. }),
        "{err}"
    );
}

/// An official index beside the videos (`lists/train.csv` listing absolute paths into
/// `videos/`) reads with the root set to their common folder; relative entries still count from
/// the index's folder; nothing outside the root is read.
#[tokio::test]
async fn index_root_admits_entries_beside_the_index() {
    let parent = tempfile::tempdir().unwrap();
    let data = std::fs::canonicalize(parent.path()).unwrap().join("data");
    make_tree(&data.join("videos")).await;
    std::fs::create_dir_all(data.join("lists")).unwrap();
    std::fs::write(parent.path().join("outside.mp4"), b"x").unwrap();
    let d = data.display().to_string();
    let index = format!(
        "{d}/videos/v1.mp4 0\n\
         file://{d}/videos/sub/v2.MOV 1\n\
         ../videos/sub/deeper/v3.webm 2\n\
         ../../outside.mp4 3\n\
         {d}/../outside.mp4 4\n"
    );
    std::fs::write(data.join("lists/train.csv"), index).unwrap();
    let spec = format!("{d}/lists/train.csv");

    // Without a root the index's folder is the store: only refusals.
    let ds = dataset::open(&spec, &s3()).await.unwrap();
    assert!(ds.entries.is_empty(), "{:?}", ds.entries);
    assert_eq!(ds.rejected.len(), 5);

    let ds = dataset::open_in(&spec, Some(&format!("{d}/")), &s3())
        .await
        .unwrap();
    assert_eq!(ds.store.url(), format!("file://{d}/"));
    let rels: Vec<&str> = ds.entries.iter().map(|e| e.rel.as_str()).collect();
    assert_eq!(
        rels,
        [
            "videos/v1.mp4",
            "videos/sub/v2.MOV",
            "videos/sub/deeper/v3.webm"
        ]
    );
    let refused: Vec<(&str, &str)> = ds
        .rejected
        .iter()
        .map(|r| (r.entry.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            ("../../outside.mp4", "path_escapes_store"),
            (&format!("{d}/../outside.mp4")[..], "path_escapes_store"),
        ]
    );

    // An index outside the root: its absolute entries inside the root read, relative ones
    // are refused with the reason.
    std::fs::write(
        parent.path().join("elsewhere.csv"),
        format!("{d}/videos/v1.mp4 0\nvideos/v1.mp4 1\n"),
    )
    .unwrap();
    let spec = format!("{}/elsewhere.csv", parent.path().display());
    let ds = dataset::open_in(&spec, Some(&format!("{d}/videos/")), &s3())
        .await
        .unwrap();
    assert_eq!(ds.entries.len(), 1);
    assert_eq!(ds.entries[0].rel, "v1.mp4");
    assert_eq!(ds.rejected.len(), 1);
    assert!(
        ds.rejected[0].detail.contains("outside the index root"),
        "{:?}",
        ds.rejected
    );
}
