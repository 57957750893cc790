//! S3 stores.
//!
//! `s3_round_trip` and `s3_wrong_secret` run against a real `s3s-fs` server when the binary is
//! on PATH (skipped otherwise, or failing when VJEPA_REQUIRE_S3=1). `s3_denied_error_is_redacted`
//! uses a tiny fake endpoint and always runs.

use std::io::{Read, Write};
use std::net::TcpListener;

use bytes::Bytes;
use vjepa_storage::dataset::{self, DatasetEntry};
use vjepa_storage::tables::{self, MetricsRow, MetricsWriter};
use vjepa_storage::testing::S3Server;
use vjepa_storage::{ObjectInfo, S3Settings, StorageError, Store, checkpoints};

fn server_or_skip(test: &str) -> Option<S3Server> {
    match S3Server::start_or_skip(test) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip() {
    let Some(server) = server_or_skip("s3_round_trip") else {
        return;
    };
    server.create_bucket("bucket").unwrap();
    let (ak, sk) = (server.access_key.as_str(), server.secret_key.as_str());
    let settings = server.settings();

    let store = Store::open_with_credentials("s3://bucket/prefix/", &settings, ak, sk).unwrap();
    assert_eq!(store.url(), "s3://bucket/prefix/");
    assert_eq!(store.uri_of("a/b.bin"), "s3://bucket/prefix/a/b.bin");

    store
        .put("a/b.bin", Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    store
        .put("c.mp4", Bytes::from_static(b"video"))
        .await
        .unwrap();
    // An object of the same bucket outside the prefix, and one whose name shares the prefix.
    let whole = Store::open_with_credentials("s3://bucket/", &settings, ak, sk).unwrap();
    whole
        .put("other/z.mp4", Bytes::from_static(b"z"))
        .await
        .unwrap();
    whole
        .put("prefix2/z.mp4", Bytes::from_static(b"z"))
        .await
        .unwrap();

    assert_eq!(
        store.get("a/b.bin").await.unwrap(),
        Bytes::from_static(b"0123456789")
    );
    assert_eq!(
        store.get_range("a/b.bin", 3..7).await.unwrap(),
        Bytes::from_static(b"3456")
    );
    assert_eq!(store.head("c.mp4").await.unwrap().size, 5);
    assert!(store.exists("c.mp4").await.unwrap());
    assert!(!store.exists("nope.mp4").await.unwrap());
    assert!(store.get("nope.mp4").await.unwrap_err().is_not_found());
    let listed = store.list().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|o: &ObjectInfo| (o.path.as_str(), o.size))
            .collect::<Vec<_>>(),
        [("a/b.bin", 10), ("c.mp4", 5)]
    );
    // The object version is the ETag, unquoted; a replacement changes it. (s3s-fs lists no
    // ETags, AWS S3 and MinIO do: a listed tag must then be the HEAD's.)
    let head = store.head("c.mp4").await.unwrap();
    assert!(
        head.tag.as_deref().is_some_and(|t| !t.contains('"')),
        "{head:?}"
    );
    assert!(listed[1].tag.is_none() || listed[1].tag == head.tag);
    store
        .put("c.mp4", Bytes::from_static(b"54321"))
        .await
        .unwrap();
    assert_ne!(store.head("c.mp4").await.unwrap().tag, head.tag);
    store
        .put("c.mp4", Bytes::from_static(b"video"))
        .await
        .unwrap();
    assert_eq!(
        store.head("c.mp4").await.unwrap().tag,
        head.tag,
        "same bytes, same ETag"
    );
    assert!(matches!(
        store.get("../other/z.mp4").await,
        Err(StorageError::PathEscapesRoot { .. })
    ));

    // Parquet through BufWriter (multipart or single put) on S3.
    let mut w = MetricsWriter::create(&store, "metrics.parquet")
        .await
        .unwrap();
    let r = MetricsRow {
        step: 3,
        loss_per_mask: vec![1.0],
        ..Default::default()
    };
    w.push(r.clone());
    w.flush().await.unwrap();
    assert_eq!(w.close().await.unwrap(), 1);
    assert_eq!(
        tables::read_metrics(&store, "metrics.parquet")
            .await
            .unwrap(),
        vec![r]
    );

    // Checkpoints.
    checkpoints::write(&store, 7, Bytes::from_static(b"ckpt7"))
        .await
        .unwrap();
    checkpoints::write(&store, 12, Bytes::from_static(b"ckpt12"))
        .await
        .unwrap();
    assert_eq!(
        checkpoints::latest(&store).await.unwrap(),
        Some((12, checkpoints::path_for_step(12)))
    );

    // A dataset index on S3.
    store
        .put(
            "index.csv",
            Bytes::from_static(
                b"c.mp4 1\ns3://bucket/prefix/a/b.bin 2\ns3://bucket/other/z.mp4 3\n../other/z.mp4\n",
            ),
        )
        .await
        .unwrap();
    let ds = dataset::open_with_credentials("s3://bucket/prefix/index.csv", &settings, ak, sk)
        .await
        .unwrap();
    assert_eq!(ds.store.url(), "s3://bucket/prefix/");
    assert_eq!(
        ds.entries,
        vec![
            DatasetEntry {
                rel: "c.mp4".into(),
                label: Some("1".into()),
                tag: None,
            },
            DatasetEntry {
                rel: "a/b.bin".into(),
                label: Some("2".into()),
                tag: None,
            },
        ]
    );
    assert_eq!(ds.rejected.len(), 2);
    assert!(ds.rejected.iter().all(|r| r.reason == "path_escapes_store"));

    // A listed prefix keeps only videos.
    let ds = dataset::open_with_credentials("s3://bucket/prefix/", &settings, ak, sk)
        .await
        .unwrap();
    assert_eq!(
        ds.entries,
        vec![DatasetEntry {
            rel: "c.mp4".into(),
            label: None,
            tag: None, // s3s-fs lists no ETags
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_secret() {
    let Some(server) = server_or_skip("s3_wrong_secret") else {
        return;
    };
    server.create_bucket("bucket").unwrap();
    let good = Store::open_with_credentials(
        "s3://bucket/",
        &server.settings(),
        &server.access_key,
        &server.secret_key,
    )
    .unwrap();
    good.put("x.bin", Bytes::from_static(b"x")).await.unwrap();

    let wrong = "wrong-secret-0123456789abcdef";
    let bad = Store::open_with_credentials(
        "s3://bucket/",
        &server.settings(),
        &server.access_key,
        wrong,
    )
    .unwrap();
    let err = bad.get("x.bin").await.unwrap_err();
    assert!(matches!(err, StorageError::AccessDenied { .. }), "{err}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(wrong), "secret leaked: {text}");
        assert!(!text.contains(&server.secret_key), "secret leaked: {text}");
    }
    let err = bad.list().await.unwrap_err();
    assert!(!err.to_string().contains(wrong));
}

/// A fake S3 endpoint answering 403 with a body that echoes the secret: the error we return
/// must still not contain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_denied_error_is_redacted() {
    let secret = "TOPSECRET-abcdefghijklmnop";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(
        "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>echo {secret}</Message></Error>"
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 8192];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    let settings = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        allow_http: true,
        ..Default::default()
    };
    let store = Store::open_with_credentials("s3://bkt/p/", &settings, "AKFAKE", secret).unwrap();
    let err = store.get("x.mp4").await.unwrap_err();
    assert!(matches!(err, StorageError::AccessDenied { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("s3://bkt/p/x.mp4"), "{text}");
    assert!(
        text.contains("[REDACTED]"),
        "the fake body should have been seen: {text}"
    );
    assert!(!text.contains(secret), "{text}");
    assert!(!format!("{err:?}").contains(secret));
    assert!(!format!("{store:?}").contains(secret));
}

/// The test environment names credentials (or a public bucket) itself: the tests that need
/// none only check what they can.
/// Without any credentials in the environment, opening S3 fails with an actionable message.
/// (Only meaningful when the test environment has no AWS credentials; otherwise it just checks
/// that opening succeeds.)
#[test]
fn s3_env_credentials_required() {
    let has_env = vjepa_storage::env_has_s3_credentials();
    // Nothing answers as the instance metadata service (a closed local port): no role either.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let settings = S3Settings {
        endpoint: Some("https://s3.example.invalid".into()),
        metadata_endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    };
    let res = Store::open("s3://bucket/x/", &settings, false);
    if has_env {
        eprintln!("AWS credentials present in the environment; only checking open");
        let _ = res;
    } else {
        let err = res.unwrap_err();
        assert!(
            matches!(err, StorageError::MissingCredentials { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("AWS_SECRET_ACCESS_KEY")
                && text.contains("instance profile")
                && (text.contains("no instance metadata service")
                    || text.contains("AWS_EC2_METADATA_DISABLED")),
            "{text}"
        );
    }
}

/// A stand-in for the EC2 instance metadata service on a local port (IMDSv2: a session token,
/// then the role's name, then its credentials, here the S3 server's keys); returns its
/// endpoint and the paths it was asked for.
fn metadata_service(
    access_key: &str,
    secret_key: &str,
    role: Option<&'static str>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let creds = format!(
        r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{access_key}","SecretAccessKey":"{secret_key}","Token":"session-token","Expiration":"2099-01-01T00:00:00Z"}}"#
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let line = head.lines().next().unwrap_or_default().to_string();
            let has_token = head
                .to_ascii_lowercase()
                .contains("x-aws-ec2-metadata-token: token-1");
            seen.lock().unwrap().push(line.clone());
            let base = "/latest/meta-data/iam/security-credentials/";
            let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["PUT", "/latest/api/token"] => (200, "token-1".to_string()),
                [_, _] if !has_token => (401, String::new()),
                ["GET", p] if p == base => match role {
                    Some(r) => (200, r.to_string()),
                    None => (404, String::new()),
                },
                ["GET", p] if role.is_some_and(|r| p == format!("{base}{r}")) => {
                    (200, creds.clone())
                }
                _ => (404, String::new()),
            };
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (endpoint, asked)
}

/// On a machine with an IAM role (an EC2 instance profile) and no keys in the environment, the
/// store reads and writes with the role's credentials, fetched from the instance metadata
/// service; without a role attached, opening is refused at once, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_from_an_instance_profile() {
    if vjepa_storage::env_has_s3_credentials()
        || std::env::var_os("AWS_EC2_METADATA_DISABLED").is_some()
    {
        eprintln!("skipping: credentials or metadata settings in the environment");
        return;
    }
    let Some(server) = server_or_skip("s3_credentials_from_an_instance_profile") else {
        return;
    };
    server.create_bucket("bucket").unwrap();
    let (endpoint, asked) =
        metadata_service(&server.access_key, &server.secret_key, Some("job-role"));
    let settings = S3Settings {
        metadata_endpoint: Some(endpoint),
        ..server.settings()
    };
    let store = Store::open("s3://bucket/runs/", &settings, false).unwrap();
    store
        .put("a.bin", Bytes::from_static(b"from the role"))
        .await
        .unwrap();
    assert_eq!(
        store.get("a.bin").await.unwrap(),
        Bytes::from_static(b"from the role")
    );
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|l| l.starts_with("GET /latest/meta-data/iam/security-credentials/job-role")),
        "{asked:?}"
    );

    // The same machine without a role: refused when the store is opened.
    let (endpoint, _) = metadata_service(&server.access_key, &server.secret_key, None);
    let settings = S3Settings {
        metadata_endpoint: Some(endpoint),
        ..server.settings()
    };
    let err = Store::open("s3://bucket/runs/", &settings, false).unwrap_err();
    assert!(
        matches!(err, StorageError::MissingCredentials { .. })
            && err.to_string().contains("no IAM role attached"),
        "{err}"
    );
}
