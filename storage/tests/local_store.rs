//! Local-directory stores: every operation, the location forms, and '..' handling.

use bytes::Bytes;
use vjepa_storage::{ObjectInfo, S3Settings, StorageError, Store, checkpoints};

fn s3() -> S3Settings {
    S3Settings::default()
}

/// A relative path from the current directory to `target` (absolute).
fn relative_from_cwd(target: &std::path::Path) -> String {
    let cwd = std::env::current_dir().unwrap();
    let ups = cwd.components().count() - 1; // minus the root
    let mut rel = "../".repeat(ups);
    rel.push_str(target.strip_prefix("/").unwrap().to_str().unwrap());
    rel
}

#[tokio::test]
async fn put_get_range_head_list_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap(), &s3(), false).unwrap();
    assert!(store.is_local());
    assert!(store.url().starts_with("file:///"), "{}", store.url());
    assert!(store.url().ends_with('/'));

    store
        .put("a/b.bin", Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    store
        .put("c.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    store.put("a/z/d.bin", Bytes::new()).await.unwrap();

    assert_eq!(
        store.get("a/b.bin").await.unwrap(),
        Bytes::from_static(b"0123456789")
    );
    assert_eq!(
        store.get_range("a/b.bin", 2..5).await.unwrap(),
        Bytes::from_static(b"234")
    );
    assert_eq!(
        store.get_range("a/b.bin", 4..4).await.unwrap(),
        Bytes::new()
    );
    assert!(matches!(
        store
            .get_range("a/b.bin", std::ops::Range { start: 5, end: 4 })
            .await,
        Err(StorageError::InvalidRange { .. })
    ));
    let head = store.head("a/b.bin").await.unwrap();
    assert_eq!((head.path.as_str(), head.size), ("a/b.bin", 10));
    let listed = store.list().await.unwrap();
    assert_eq!(
        paths_and_sizes(&listed),
        [("a/b.bin", 10), ("a/z/d.bin", 0), ("c.txt", 5)]
    );
    // A listing and a HEAD name the same object version; replacing the object changes it.
    assert!(head.tag.is_some());
    assert_eq!(listed[0].tag, head.tag);
    store
        .put("a/b.bin", Bytes::from_static(b"9876543210"))
        .await
        .unwrap();
    let replaced = store.head("a/b.bin").await.unwrap();
    assert_eq!(replaced.size, 10);
    assert_ne!(
        replaced.tag, head.tag,
        "same name and size, another version"
    );
    assert_eq!(store.list().await.unwrap()[0].tag, replaced.tag);
    assert_eq!(
        paths_and_sizes(&store.list_prefix("a/z").await.unwrap()),
        [("a/z/d.bin", 0)]
    );
    assert!(store.list_prefix("nothing/here").await.unwrap().is_empty());
    assert!(store.exists("c.txt").await.unwrap());
    assert!(!store.exists("missing.txt").await.unwrap());

    let err = store.get("missing.txt").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string().contains(&store.uri_of("missing.txt")),
        "{err}"
    );

    // put replaces atomically; delete removes.
    store
        .put("c.txt", Bytes::from_static(b"bye"))
        .await
        .unwrap();
    assert_eq!(
        store.get("c.txt").await.unwrap(),
        Bytes::from_static(b"bye")
    );
    store.delete("c.txt").await.unwrap();
    assert!(!store.exists("c.txt").await.unwrap());

    assert_eq!(
        store.local_path("a/b.bin").unwrap(),
        std::fs::canonicalize(dir.path()).unwrap().join("a/b.bin")
    );
    assert_eq!(store.uri_of("a/./b.bin"), format!("{}a/b.bin", store.url()));
}

#[tokio::test]
async fn location_forms_agree() {
    let dir = tempfile::tempdir().unwrap();
    let abs = std::fs::canonicalize(dir.path()).unwrap();
    let by_path = Store::open(abs.to_str().unwrap(), &s3(), false).unwrap();
    by_path
        .put("x/y.mp4", Bytes::from_static(b"v"))
        .await
        .unwrap();

    let file_url = format!("file://{}/", abs.display());
    let by_url = Store::open(&file_url, &s3(), false).unwrap();
    assert_eq!(by_url.url(), by_path.url());
    assert_eq!(by_url.url(), file_url);

    let rel = relative_from_cwd(&abs);
    let by_rel = Store::open(&rel, &s3(), false).unwrap();
    assert_eq!(by_rel.url(), by_path.url());

    let with_dots = format!("{}/x/../", abs.display());
    let by_dots = Store::open(&with_dots, &s3(), false).unwrap();
    assert_eq!(by_dots.url(), by_path.url());

    for s in [&by_url, &by_rel, &by_dots] {
        assert_eq!(s.get("x/y.mp4").await.unwrap(), Bytes::from_static(b"v"));
    }
}

#[tokio::test]
async fn create_flag_and_bad_roots() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("new/nested/out");
    let err = Store::open(missing.to_str().unwrap(), &s3(), false).unwrap_err();
    assert!(matches!(err, StorageError::LocalDirMissing { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    let store = Store::open(missing.to_str().unwrap(), &s3(), true).unwrap();
    assert!(missing.is_dir());
    store.put("f", Bytes::from_static(b"1")).await.unwrap();

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(file.to_str().unwrap(), &s3(), true).unwrap_err();
    assert!(matches!(err, StorageError::NotADirectory { .. }), "{err}");

    for bad in ["http://example.com/x/", "gs://bucket/x/"] {
        let err = Store::open(bad, &s3(), false).unwrap_err();
        assert!(
            matches!(err, StorageError::UnsupportedScheme { .. }),
            "{bad}: {err}"
        );
    }
    assert!(matches!(
        Store::open("", &s3(), false),
        Err(StorageError::InvalidLocation { .. })
    ));
}

#[tokio::test]
async fn dotdot_never_leaves_the_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(parent.path().join("secret.txt"), b"outside").unwrap();
    let store = Store::open(root.to_str().unwrap(), &s3(), false).unwrap();

    // '..' inside the root is resolved.
    store
        .put("a/../b.txt", Bytes::from_static(b"b"))
        .await
        .unwrap();
    assert!(root.join("b.txt").is_file());
    assert_eq!(
        store.get("x/y/../../b.txt").await.unwrap(),
        Bytes::from_static(b"b")
    );

    // '..' above the root is refused, for every operation.
    for rel in ["../secret.txt", "a/../../secret.txt", "./../secret.txt"] {
        let err = store.get(rel).await.unwrap_err();
        assert!(
            matches!(err, StorageError::PathEscapesRoot { .. }),
            "{rel}: {err}"
        );
        assert!(store.exists(rel).await.is_err());
        assert!(store.head(rel).await.is_err());
        assert!(store.get_range(rel, 0..1).await.is_err());
        assert!(store.put(rel, Bytes::from_static(b"x")).await.is_err());
    }
    assert!(store.list_prefix("..").await.is_err());
    assert_eq!(
        std::fs::read(parent.path().join("secret.txt")).unwrap(),
        b"outside"
    );

    // Absolute paths and the root itself are not object paths.
    assert!(matches!(
        store.get("/etc/passwd").await,
        Err(StorageError::InvalidPath { .. })
    ));
    assert!(matches!(
        store.get("").await,
        Err(StorageError::InvalidPath { .. })
    ));
    assert!(matches!(
        store.get("a/..").await,
        Err(StorageError::InvalidPath { .. })
    ));
}

#[tokio::test]
async fn checkpoints_latest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap(), &s3(), false).unwrap();
    assert_eq!(checkpoints::latest(&store).await.unwrap(), None);
    for step in [5u64, 100, 20] {
        let rel = checkpoints::write(&store, step, Bytes::from(vec![step as u8; 4]))
            .await
            .unwrap();
        assert_eq!(rel, checkpoints::path_for_step(step));
    }
    store
        .put("checkpoints/notes.txt", Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .put(
            "checkpoints/step-99999999999.safetensors.partial",
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
    store
        .put(
            "checkpoints/old/step-999.safetensors",
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
    let (step, rel) = checkpoints::latest(&store).await.unwrap().unwrap();
    assert_eq!(step, 100);
    assert_eq!(rel, "checkpoints/step-00000100.safetensors");
    assert_eq!(store.get(&rel).await.unwrap(), Bytes::from(vec![100u8; 4]));
}

fn paths_and_sizes(listed: &[ObjectInfo]) -> Vec<(&str, u64)> {
    listed.iter().map(|o| (o.path.as_str(), o.size)).collect()
}
