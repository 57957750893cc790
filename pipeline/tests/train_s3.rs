//! The same config on S3 (a real, signature-checking `s3s-fs` on 127.0.0.1) gives the same loss
//! trace, step for step, as on a local directory — and with a different worker count, since the
//! clip sequence is a function of the seed and the clip number only.

mod common;

use common::*;
use vjepa_storage::testing::S3Server;

#[test]
fn s3_run_matches_local_run_step_for_step() {
    let Some(server) = S3Server::start_or_skip("s3_run_matches_local_run_step_for_step").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 5);
    let steps = 6;

    // Local run, with as many workers as the S3 run: training is data parallel, so the
    // worker count sets the order gradients are summed in (`tests/cluster.rs` compares counts).
    let local_out = tmp.path().join("local-out");
    let local_cfg = tmp.path().join("local.yaml");
    write_config(&local_cfg, &videos, &local_out, steps);
    assert_ok(&run_train(&local_cfg, &[], &["--workers", "2"]));

    // The same videos in a bucket; outputs to the bucket too.
    videos_into_bucket(&server, "corpus", &videos);
    let s3_cfg = tmp.path().join("s3.yaml");
    let text = s3_small_config(
        &server,
        "s3://corpus/videos/",
        "s3://corpus/runs/one/",
        steps,
    );
    std::fs::write(&s3_cfg, text).unwrap();
    let envs = [
        ("AWS_ACCESS_KEY_ID", server.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", server.secret_key.as_str()),
    ];
    let run = run_train(&s3_cfg, &envs, &["--workers", "2"]);
    assert_ok(&run);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        !logs.contains(&server.secret_key),
        "the secret key appeared in the job's output"
    );

    let local = read_metrics(local_out.to_str().unwrap(), &Default::default());
    // Read the S3 run's metrics through S3 as well.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open_with_credentials(
        "s3://corpus/runs/one/",
        &server.settings(),
        &server.access_key,
        &server.secret_key,
    )
    .unwrap();
    let remote = rt
        .block_on(vjepa_storage::tables::read_metrics_all(&store))
        .unwrap();
    assert_eq!(local.len() as u64, steps);
    assert_same_trace(&local, &remote);
    assert!(
        rt.block_on(store.exists(&format!("checkpoints/step-{steps:08}.safetensors")))
            .unwrap(),
        "final checkpoint written to S3"
    );
    // `vjepa metrics` and `vjepa inspect` reach the bucket through the job config's storage.s3
    // (no endpoint in the environment).
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args)
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("run vjepa")
    };
    let cfg = s3_cfg.to_str().unwrap();
    let out = cli(&["metrics", "s3://corpus/runs/one/", "--config", cfg]);
    assert_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count() as u64,
        steps
    );
    let ckpt = format!("s3://corpus/runs/one/checkpoints/step-{steps:08}.safetensors");
    let out = cli(&["inspect", &ckpt, "--config", cfg]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("step {steps},")));
    // `vjepa convert` reads from the bucket too (to the official layout, locally).
    let pth = tmp.path().join("from-s3.pth.tar");
    assert_ok(&cli(&[
        "convert",
        &ckpt,
        pth.to_str().unwrap(),
        "--config",
        cfg,
    ]));
    assert!(std::fs::metadata(&pth).unwrap().len() > 0);
    // A wrong secret is refused by the server: the job fails before training without printing
    // the secret, with exit 2 (retrying cannot help), as does a bucket that does not exist.
    let bad = [
        ("AWS_ACCESS_KEY_ID", server.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret"),
    ];
    let run = run_train(&s3_cfg, &bad, &[]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("definitely-not-the-secret"));
    let no_bucket = tmp.path().join("no-bucket.yaml");
    let text = std::fs::read_to_string(&s3_cfg)
        .unwrap()
        .replace("s3://corpus/", "s3://no-such-bucket/");
    assert!(text.contains("s3://no-such-bucket/"));
    std::fs::write(&no_bucket, text).unwrap();
    let run = run_train(&no_bucket, &s3_env(&server), &[]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("the bucket does not exist"), "{err}");
}

/// `vjepa train --config cfg` with `server`'s credentials, its stderr read until the first
/// step's log line. Returns the child, the rest of its stderr and the log so far.
fn start_until_first_step(
    cfg: &std::path::Path,
    server: &S3Server,
) -> (std::process::Child, StderrLines, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .envs(s3_env(server))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("step=1 ") && line.contains("train") {
            break;
        }
    }
    (child, lines, log)
}

type StderrLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Appends the rest of the child's stderr to `log` (until it exits).
fn read_rest(lines: StderrLines, log: &mut String) {
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
}

/// A store that stops answering is not the videos' fault: no video is quarantined for it,
/// the job ends naming the store once the clip's attempts are spent, and nothing of the
/// corpus is lost for the run that resumes.
#[test]
fn an_unreachable_store_quarantines_nothing() {
    let Some(server) = S3Server::start_or_skip("an_unreachable_store_quarantines_nothing").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = s3_corpus_config(&server, tmp.path(), |text| {
        let text = text
            .replace("  max_attempts_per_clip: 100", "  max_attempts_per_clip: 2")
            .replace("  linger_secs: 30", "  linger_secs: 0");
        assert!(text.contains("max_attempts_per_clip: 2") && text.contains("linger_secs: 0"));
        text
    });
    // The first step trained: the store goes away.
    let (mut child, lines, mut log) = start_until_first_step(&cfg, &server);
    drop(server);
    read_rest(lines, &mut log);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("the store could not be read"), "{log}");
    let q = read_quarantine(out.to_str().unwrap());
    assert!(
        q.is_empty(),
        "nothing quarantined for the store's outage: {q:?}"
    );
    assert!(!read_metrics(out.to_str().unwrap(), &Default::default()).is_empty());
}

/// A stop asked while the store is out (clips that may not come for minutes) does not wait
/// for them: the run ends with the steps it trained, checkpointed, and exits 143 at once.
#[test]
fn sigterm_during_an_outage_stops_without_waiting_for_the_store() {
    let Some(server) =
        S3Server::start_or_skip("sigterm_during_an_outage_stops_without_waiting_for_the_store")
            .unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // Periodic checkpoints out of reach: the one at the stop is the stop's own.
    let (cfg, out) = s3_corpus_config(&server, tmp.path(), without_periodic_checkpoints);
    let (mut child, lines, mut log) = start_until_first_step(&cfg, &server);
    drop(server);
    // The clips already loaded are trained; then the job waits on the store (each clip has
    // 100 attempts, each with the S3 client's own retries: many minutes).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let asked = std::time::Instant::now();
    sigterm(child.id());
    read_rest(lines, &mut log);
    let status = child.wait().unwrap();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(
        took < std::time::Duration::from_secs(30),
        "took {took:?} to stop:\n{log}"
    );
    assert!(log.contains("while waiting for the clips of step"), "{log}");
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    let trained = rows.len() as u64;
    assert!(trained >= 1, "{log}");
    assert!(
        log.contains(&format!(
            "stopped by SIGTERM after step {trained} with its checkpoint"
        )),
        "{log}"
    );
    assert!(
        out.join(format!("checkpoints/step-{trained:08}.safetensors"))
            .exists(),
        "the checkpoint of the last step trained:\n{log}"
    );
    assert!(read_quarantine(out.to_str().unwrap()).is_empty());
}

/// `storage.s3.max_retries` and `request_timeout_secs` bound how long a store that accepts
/// connections and never answers holds the job (object_store's defaults: 30 s a request,
/// retried for up to 3 minutes). No S3 server needed: a listener that never replies.
#[test]
fn s3_timeouts_bound_a_store_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = tmp.path().join("s3.yaml");
    let text = small_config("s3://corpus/videos/", &format!("{}/", out.display()), 5)
        .replace("    endpoint: null", &format!("    endpoint: {endpoint}"))
        .replace("    region: null", "    region: us-east-1")
        .replace(
            "    allow_http: false",
            "    allow_http: true\n    max_retries: 0\n    request_timeout_secs: 1",
        );
    assert!(
        text.contains("request_timeout_secs: 1"),
        "quickstart.yaml layout changed"
    );
    std::fs::write(&cfg, text).unwrap();
    let started = std::time::Instant::now();
    let run = run_train(
        &cfg,
        &[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ],
        &[],
    );
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        took < std::time::Duration::from_secs(20),
        "took {took:?}: {err}"
    );
    drop(silent);
}

/// `check-config --reach` asks the store, as a pre-start check: what the store refuses (no
/// such bucket or object, an empty prefix, a wrong secret) exits 2 naming the key, a store that
/// does not answer exits 1 within the timeout, and nothing is written.
#[test]
fn check_config_reach_asks_the_store() {
    let Some(server) = S3Server::start_or_skip("check_config_reach_asks_the_store").unwrap() else {
        return;
    };
    let bucket = server.create_bucket("corpus").unwrap();
    std::fs::create_dir_all(bucket.join("videos")).unwrap();
    std::fs::write(bucket.join("videos/a.mp4"), b"not looked at").unwrap();
    std::fs::write(bucket.join("videos/b.mp4"), b"not looked at").unwrap();
    std::fs::write(bucket.join("index.csv"), b"videos/a.mp4 0\n").unwrap();
    std::fs::create_dir_all(bucket.join("docs")).unwrap();
    std::fs::write(bucket.join("docs/readme.txt"), b"no video here").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let check = |dataset: &str, envs: &[(&str, &str)], extra: &[&str]| {
        let text = s3_small_config(&server, dataset, "s3://corpus/runs/one/", 5);
        let cfg = tmp.path().join("reach.yaml");
        std::fs::write(&cfg, text).unwrap();
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["check-config", "--config", cfg.to_str().unwrap(), "--reach"])
            .args(extra)
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run vjepa check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let env = s3_env(&server);

    let (code, text) = check("s3://corpus/videos/", &env, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("location: data.datasets[0] = s3://corpus/videos/")
            && text.contains("reached (listed: a video, a.mp4)"),
        "{text}"
    );
    assert!(
        text.contains("location: outputs.dir = s3://corpus/runs/one/")
            && text.contains("reached (listed: empty)"),
        "{text}"
    );
    let (code, text) = check("s3://corpus/index.csv", &env, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("reached (HEAD: 15 bytes)"), "{text}");
    assert!(
        !bucket.join("runs").exists(),
        "the check writes nothing to the output"
    );

    for (dataset, why) in [
        ("s3://corpus/missing.csv", "the store has no such object"),
        (
            "s3://corpus/empty/",
            "the store lists no video file under this prefix",
        ),
        (
            "s3://corpus/docs/",
            "the store lists no video file under this prefix",
        ),
        ("s3://no-such-bucket/videos/", "the bucket does not exist"),
    ] {
        let (code, text) = check(dataset, &env, &[]);
        assert_eq!(code, Some(2), "{dataset}: {text}");
        assert!(
            text.contains(&format!("data.datasets[0] ({dataset}): {why}")),
            "{dataset}: {text}"
        );
    }
    let bad = [
        ("AWS_ACCESS_KEY_ID", server.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret"),
    ];
    let (code, text) = check("s3://corpus/videos/", &bad, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(!text.contains("definitely-not-the-secret"), "{text}");
    // A HEAD's refusal has no body to name its reason: refused all the same.
    let (code, text) = check("s3://corpus/index.csv", &bad, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("the store refused access"), "{text}");
    assert!(!text.contains("definitely-not-the-secret"), "{text}");

    // A store that accepts connections and never answers: exit 1 (worth retrying), in time.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let text = s3_small_config(&server, "s3://corpus/videos/", "s3://corpus/runs/one/", 5)
        .replace(&server.endpoint, &endpoint);
    let cfg = tmp.path().join("silent.yaml");
    std::fs::write(&cfg, text).unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .args(["--reach", "--reach-timeout", "2"])
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT")
        .envs(env)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no answer within 2 s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// s3s-fs, like some other servers, ignores `If-Match` on reads: the ETag of the answer still
/// shows a video replaced while a clip reads it, which fails that read as `Changed` (the clip
/// tries another video; nothing is quarantined) instead of splicing two files.
#[test]
fn a_video_replaced_in_the_bucket_is_not_read_as_the_one_opened() {
    let Some(server) =
        S3Server::start_or_skip("a_video_replaced_in_the_bucket_is_not_read_as_the_one_opened")
            .unwrap()
    else {
        return;
    };
    server.create_bucket("corpus").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open_with_credentials(
        "s3://corpus/videos/",
        &server.settings(),
        &server.access_key,
        &server.secret_key,
    )
    .unwrap();
    let put = |bytes: &'static [u8]| {
        rt.block_on(store.put("v.mp4", bytes::Bytes::from_static(bytes)))
            .unwrap()
    };
    put(b"first version");
    let (object_store, _) = store.inner();
    let path = store.path_of("v.mp4").unwrap();
    let source =
        vjepa_ingest::ObjectSource::open(object_store.clone(), path.clone(), rt.handle().clone())
            .unwrap();
    use vjepa_ingest::ByteSource;
    assert_eq!(&source.read(0..5).unwrap()[..], b"first");
    put(b"other version");
    let err = source.read(6..13).unwrap_err();
    assert!(
        matches!(err, vjepa_ingest::IngestError::Changed(_)),
        "{err:?}"
    );
    let reopened =
        vjepa_ingest::ObjectSource::open(object_store, path, rt.handle().clone()).unwrap();
    assert_eq!(&reopened.read(0..5).unwrap()[..], b"other");
}
