//! A live catalog against a real S3 server (`s3s-fs`): while a run is going, a video uploaded to
//! the listed prefix is sampled once the next listing takes effect, a deleted one is never drawn
//! after the listing without it, and a quarantined one leaves the catalog at the next refresh.
//! What was drawn is read from `clips.parquet` (`outputs.clips: true`), the catalog versions
//! from `catalog/step-*.json`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use vjepa_pipeline::catalog::VersionRecord;
use vjepa_storage::testing::S3Server;

const REFRESH_SECS: f64 = 1.0;

fn now_us() -> i64 {
    vjepa_pipeline::now_unix_us()
}

#[test]
fn added_videos_are_sampled_and_deleted_ones_never_drawn_after_the_next_refresh() {
    let Some(server) = S3Server::start_or_skip(
        "added_videos_are_sampled_and_deleted_ones_never_drawn_after_the_next_refresh",
    )
    .unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let names = sorted_names(&videos);
    assert_eq!(names.len(), 4);

    // Three videos and one file that is not a video in the bucket; the fourth video comes later.
    let bucket = server.create_bucket("corpus").unwrap();
    let dst = bucket.join("videos");
    std::fs::create_dir_all(&dst).unwrap();
    for name in &names[..3] {
        std::fs::copy(videos.join(name), dst.join(name)).unwrap();
    }
    std::fs::write(dst.join("broken.mp4"), b"not a video at all ".repeat(500)).unwrap();

    let steps = 36;
    let cfg = tmp.path().join("s3.yaml");
    let text = s3_small_config(
        &server,
        "s3://corpus/videos/",
        "s3://corpus/runs/one/",
        steps,
    );
    let text = format!(
        "{}\ncatalog:\n  refresh_secs: {REFRESH_SECS}\n",
        with_clip_records(text)
    );
    std::fs::write(&cfg, text).unwrap();

    let envs = [
        ("AWS_ACCESS_KEY_ID", server.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", server.secret_key.as_str()),
    ];
    let started = Instant::now();
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(std::fs::File::create(tmp.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(tmp.path().join("stderr.log")).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start vjepa train");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let open = |location: &str| {
        vjepa_storage::Store::open_with_credentials(
            location,
            &server.settings(),
            &server.access_key,
            &server.secret_key,
        )
        .unwrap()
    };
    let data = open("s3://corpus/videos/");
    let out = open("s3://corpus/runs/one/");

    // Once training is under way (the step-4 checkpoint exists), upload the fourth video and
    // delete one of the first three.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rt
        .block_on(out.exists("checkpoints/step-00000004.safetensors"))
        .unwrap()
    {
        assert!(Instant::now() < deadline, "the run did not reach step 4");
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = &names[3];
    let deleted = &names[0];
    let bytes = Bytes::from(std::fs::read(videos.join(added)).unwrap());
    let t_add = now_us();
    rt.block_on(data.put(added, bytes)).unwrap();
    let t_del = now_us();
    rt.block_on(data.delete(deleted)).unwrap();
    let changed_after_s = started.elapsed().as_secs_f64();

    let status = wait_with_timeout(child, Duration::from_secs(120));
    assert!(
        status.success(),
        "vjepa failed ({status:?}):\n{}",
        std::fs::read_to_string(tmp.path().join("stderr.log")).unwrap_or_default()
    );
    println!(
        "run took {:.1} s; bucket changed {changed_after_s:.1} s in",
        started.elapsed().as_secs_f64()
    );

    // The catalog versions, in step order.
    let records = version_records(&rt, &out);
    for r in &records {
        println!(
            "version {} from step {}: {} videos (+{} -{})",
            r.version,
            r.from_step,
            r.videos,
            r.added.len(),
            r.removed.len()
        );
    }
    assert_eq!(records[0].from_step, 0);
    assert_eq!(records[0].videos, 4, "three videos and the broken file");
    let uri = |name: &str| format!("s3://corpus/videos/{name}");
    let first_with = |pick: &dyn Fn(&VersionRecord) -> bool| -> VersionRecord {
        records
            .iter()
            .find(|r| pick(r))
            .cloned()
            .expect("a catalog version with the change")
    };
    let with_added = first_with(&|r| r.added.iter().any(|v| v.uri == uri(added)));
    let without_deleted = first_with(&|r| r.removed.iter().any(|v| v.uri == uri(deleted)));
    let without_broken = first_with(&|r| r.removed.iter().any(|v| v.uri == uri("broken.mp4")));
    // Each change was listed within two refresh periods.
    let period_us = (REFRESH_SECS * 1e6) as i64;
    assert!(
        with_added.listed_unix_us - t_add <= 2 * period_us,
        "the upload was listed {} µs later",
        with_added.listed_unix_us - t_add
    );
    assert!(without_deleted.listed_unix_us - t_del <= 2 * period_us);
    assert!(
        without_broken.version <= 2,
        "the quarantined file left at the first refreshes"
    );

    // What was drawn, per step.
    let clips = rt
        .block_on(vjepa_storage::tables::read_clips_all(&out))
        .unwrap();
    let mut per_step: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for c in &clips {
        per_step.entry(c.step).or_default().push(c.uri.clone());
    }
    assert_eq!(per_step.len() as u64, steps, "every step's clips recorded");
    assert!(
        per_step.values().all(|u| u.len() == 4),
        "batch_size clips per step"
    );
    assert!(
        clips.iter().all(|c| c.uri != uri("broken.mp4")),
        "a broken file never becomes a clip"
    );
    // The deleted video was drawn before and never from the version without it on.
    assert!(
        per_step
            .range(..4)
            .any(|(_, u)| u.iter().any(|x| *x == uri(deleted)))
    );
    let late: Vec<u64> = per_step
        .range(without_deleted.from_step..)
        .filter(|(_, u)| u.iter().any(|x| *x == uri(deleted)))
        .map(|(s, _)| *s)
        .collect();
    assert!(late.is_empty(), "deleted video drawn at steps {late:?}");
    // The new video is drawn from the first steps of the version that has it (uniform mixing
    // over four or five videos, four clips a step: every epoch covers all of them).
    let first_drawn = per_step
        .iter()
        .find(|(_, u)| u.iter().any(|x| *x == uri(added)))
        .map(|(s, _)| *s)
        .expect("the uploaded video was sampled");
    assert!(first_drawn >= with_added.from_step);
    assert!(
        first_drawn < with_added.from_step + 3,
        "first drawn at step {first_drawn}, version from step {}",
        with_added.from_step
    );
    let metrics = rt
        .block_on(vjepa_storage::tables::read_metrics_all(&out))
        .unwrap();
    let trained_at = metrics
        .iter()
        .find(|m| m.step == first_drawn + 1)
        .map(|m| m.time_unix_us)
        .unwrap();
    println!(
        "uploaded video listed after {:.2} s, drawn for step {first_drawn} (version from step {}), trained on {:.2} s after the upload",
        (with_added.listed_unix_us - t_add) as f64 / 1e6,
        with_added.from_step,
        (trained_at - t_add) as f64 / 1e6
    );
    // The quarantined file is on record.
    let q = rt
        .block_on(vjepa_storage::tables::read_quarantine_all(&out))
        .unwrap();
    assert!(q.iter().any(|r| r.uri == uri("broken.mp4")), "{q:?}");
}

/// A broken upload fixed under the same name (here a local folder, rewritten in place) is a
/// new object version: the quarantine covered the broken one only, so the next listing brings
/// the video back, it is trained on, and the quarantine table holds the one broken version.
#[test]
fn a_video_fixed_under_its_name_comes_back_from_quarantine() {
    let tmp = tempfile::tempdir().unwrap();
    let (made, names, videos) = partial_corpus(tmp.path(), 4, 3);
    // The fourth arrives broken (an upload gone wrong) under a video's name.
    let fixed = names[3].clone();
    std::fs::write(videos.join(&fixed), b"not a video yet ".repeat(500)).unwrap();

    let out = tmp.path().join("out");
    let steps = 80;
    let text = with_clip_records(small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    ));
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(&cfg, format!("{text}\ncatalog:\n  refresh_secs: 0.5\n")).unwrap();
    let stderr_path = tmp.path().join("stderr.log");
    let child = std::process::Command::new(bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(std::fs::File::create(tmp.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start vjepa train");

    // Once it is quarantined, the fixed file replaces it, written in place.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&stderr_path)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("video quarantined") && l.contains(fixed.as_str()))
    {
        assert!(
            Instant::now() < deadline,
            "the broken file was not quarantined"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(
        videos.join(&fixed),
        std::fs::read(made.join(&fixed)).unwrap(),
    )
    .unwrap();

    let status = wait_with_timeout(child, Duration::from_secs(180));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "vjepa failed ({status:?}):\n{stderr}");
    assert!(
        stderr.contains("back in the catalog"),
        "the return is logged:\n{stderr}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false).unwrap();
    let records = version_records(&rt, &store);
    let is_fixed = |v: &&vjepa_pipeline::catalog::VideoRef| v.rel == fixed;
    let out_version = records
        .iter()
        .find(|r| r.removed.iter().any(|v| is_fixed(&v)))
        .expect("a version without the broken file");
    let broken_tag = out_version
        .removed
        .iter()
        .find(is_fixed)
        .unwrap()
        .tag
        .clone();
    assert!(broken_tag.is_some(), "a local folder lists object versions");
    for r in &records {
        println!(
            "version {} from step {}: {} videos, added {:?}, removed {:?}",
            r.version,
            r.from_step,
            r.videos,
            r.added.iter().map(|v| (&v.rel, &v.tag)).collect::<Vec<_>>(),
            r.removed
                .iter()
                .map(|v| (&v.rel, &v.tag))
                .collect::<Vec<_>>()
        );
    }
    // Out and back in one version when the fix was listed by the first refresh after the
    // quarantine.
    let back = records
        .iter()
        .find(|r| r.from_step >= out_version.from_step && r.added.iter().any(|v| is_fixed(&v)))
        .expect("a version with the fixed file back");
    assert_ne!(back.added.iter().find(is_fixed).unwrap().tag, broken_tag);
    assert_eq!(back.videos, 4);

    // Trained on from the version that has it back. (Before that version, loaders that had
    // not met the broken file may already read the fixed one: the name is in version 0.)
    let clips = read_clips(&out);
    let drawn: Vec<u64> = clips
        .iter()
        .filter(|c| c.uri.ends_with(&format!("/{fixed}")))
        .map(|c| c.step)
        .collect();
    assert!(
        drawn.iter().any(|s| *s >= back.from_step),
        "the fixed video was trained on from step {}: {drawn:?}",
        back.from_step
    );
    println!(
        "quarantined from step {}, back from step {}, drawn for {} of {steps} steps",
        out_version.from_step,
        back.from_step,
        drawn.len()
    );
    // One record: the broken version.
    let q = rt
        .block_on(vjepa_storage::tables::read_quarantine_all(&store))
        .unwrap();
    let rows: Vec<_> = q
        .iter()
        .filter(|r| r.uri.ends_with(&format!("/{fixed}")))
        .collect();
    assert_eq!(rows.len(), 1, "{q:?}");
    assert_eq!(
        rows[0].object_version, broken_tag,
        "the broken version is the one on record"
    );
}

/// Waits for the run, killing it (and failing) if it hangs.
fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
