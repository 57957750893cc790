//! Cluster mode (data-parallel training): the same seed trained by 1 worker, by 2 workers in
//! one process and by 2 processes of 1 worker on 127.0.0.1 draws the same clip for every
//! (step, slot), keeps every replica's parameters identical after every step (the job checks
//! the digests; the metrics record them) and follows the same loss trace; and a cluster killed
//! with SIGKILL and restarted continues exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vjepa_storage::tables::ClipRow;

const STEPS: u64 = 8;

/// The small config with the clips table on.
fn cluster_config(path: &Path, videos: &Path, out: &Path, steps: u64) -> PathBuf {
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    );
    let text = text.replace(
        "  checkpoint_every: 4\n",
        "  checkpoint_every: 4\n  clips: true\n",
    );
    assert!(
        text.contains("clips: true"),
        "quickstart.yaml layout changed"
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A hostfile of `n` free ports on 127.0.0.1.
fn hostfile(path: &Path, n: usize) -> PathBuf {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let text: String = listeners
        .iter()
        .map(|l| format!("{}\n", l.local_addr().unwrap()))
        .collect();
    drop(listeners);
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The processes of one cluster run; killed if the test leaves early.
struct Cluster {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Cluster {
    fn start(cfg: &Path, hosts: &Path, n: usize, logs: &Path, tag: &str) -> Cluster {
        Self::start_with_env(cfg, hosts, n, logs, tag, &[])
    }

    /// [`Cluster::start`] with `envs` set for every process (S3 credentials).
    fn start_with_env(
        cfg: &Path,
        hosts: &Path,
        n: usize,
        logs: &Path,
        tag: &str,
        envs: &[(&str, &str)],
    ) -> Cluster {
        let mut children = Vec::new();
        let mut paths = Vec::new();
        for i in 0..n {
            let log = logs.join(format!("{tag}-process-{i}.log"));
            let file = std::fs::File::create(&log).unwrap();
            let child = Command::new(bin())
                .args(["train", "--config", cfg.to_str().unwrap()])
                .args(["--workers", "1", "--processes", &n.to_string()])
                .args(["--process", &i.to_string()])
                .args(["--hostfile", hosts.to_str().unwrap()])
                .envs(envs.iter().copied())
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("start vjepa train");
            children.push(child);
            paths.push(log);
        }
        Cluster {
            children,
            logs: paths,
        }
    }

    fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Waits for every process to exit successfully (all are killed on failure or timeout).
    fn wait_ok(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut running = false;
            for c in &mut self.children {
                match c.try_wait().unwrap() {
                    Some(status) if !status.success() => {
                        panic!("a process failed ({status}):\n{}", self.logs())
                    }
                    Some(_) => {}
                    None => running = true,
                }
            }
            if !running {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster run not done after {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (step, slot) → (uri, first frame, crop, flip): the draws a run trained on.
fn draws(rows: &[ClipRow]) -> Vec<(u64, u64, String, i64, [i64; 4], bool)> {
    rows.iter()
        .map(|r| {
            (
                r.step,
                r.slot,
                r.uri.clone(),
                r.frames.first().copied().unwrap_or(-1),
                r.crop,
                r.flip,
            )
        })
        .collect()
}

#[test]
fn one_worker_two_workers_and_two_processes_train_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 5);

    let run_in_process = |name: &str, workers: &str| {
        let out = tmp.path().join(name);
        let cfg = cluster_config(
            &tmp.path().join(format!("{name}.yaml")),
            &videos,
            &out,
            STEPS,
        );
        assert_ok(&run_train(&cfg, &[], &["--workers", workers]));
        out
    };
    let one = run_in_process("one", "1");
    let two = run_in_process("two", "2");
    // Three workers: unequal shares (2, 1, 1 clips) exercise the weighting by clip count.
    let three = run_in_process("three", "3");
    let procs = tmp.path().join("procs");
    let cfg = cluster_config(&tmp.path().join("procs.yaml"), &videos, &procs, STEPS);
    let hosts = hostfile(&tmp.path().join("hosts"), 2);
    Cluster::start(&cfg, &hosts, 2, tmp.path(), "procs").wait_ok(Duration::from_secs(90));

    // Every slot of every global batch, once, with the same draw in all three runs.
    let clips: Vec<_> = [&one, &two, &procs, &three]
        .iter()
        .map(|o| draws(&read_clips(o)))
        .collect();
    assert_eq!(clips[0].len() as u64, STEPS * 4, "{:?}", clips[0]);
    for (i, d) in clips[0].iter().enumerate() {
        assert_eq!((d.0, d.1), (i as u64 / 4, i as u64 % 4));
    }
    assert_eq!(clips[0], clips[1], "1 worker vs 2 workers");
    assert_eq!(clips[0], clips[2], "1 worker vs 2 processes");
    assert_eq!(clips[0], clips[3], "1 worker vs 3 workers");

    let metrics: Vec<_> = [&one, &two, &procs, &three]
        .iter()
        .map(|o| read_metrics(o.to_str().unwrap(), &Default::default()))
        .collect();
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m.len() as u64, STEPS);
        if i == 0 {
            // One worker: nothing to compare with, so (by default) digested after the last
            // step only.
            let (last, before) = m.split_last().unwrap();
            assert!(before.iter().all(|r| r.params_digest == 0), "{m:?}");
            assert_ne!(last.params_digest, 0, "{m:?}");
        } else {
            // Replicas: the job compared every worker's digest after every step; the column
            // holds it.
            assert!(m.iter().all(|r| r.params_digest != 0), "{m:?}");
        }
    }
    // Two workers in one process and two processes of one worker: the same computation
    // (same shares, same reduction order), so the same bits.
    assert_same_trace(&metrics[1], metrics[2].iter());
    for (a, b) in metrics[1].iter().zip(&metrics[2]) {
        assert_eq!(a.params_digest, b.params_digest, "step {}", a.step);
    }
    // One worker vs two and three: the same data and masks, gradients summed in another
    // order (f32 rounding). Measured here: 1.6e-7 relative at most over the 8 steps; 1e-5
    // leaves room for other CPUs, while a wrongly weighted average (the 2-1-1 shares of three
    // workers averaged unweighted) is off by more than that from step 2 on.
    for other in [&metrics[1], &metrics[3]] {
        for (a, b) in metrics[0].iter().zip(other) {
            assert_eq!(a.context_tokens, b.context_tokens, "step {}", a.step);
            assert_eq!(a.target_tokens, b.target_tokens, "step {}", a.step);
            let rel = (a.loss - b.loss).abs() / a.loss.abs();
            assert!(
                rel < 1e-5,
                "step {}: {} vs {} (rel {rel:e})",
                a.step,
                a.loss,
                b.loss
            );
        }
    }
}

#[test]
fn a_killed_cluster_restarted_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let steps = 16;

    let full = tmp.path().join("full");
    let cfg = cluster_config(&tmp.path().join("full.yaml"), &videos, &full, steps);
    let hosts = hostfile(&tmp.path().join("hosts-full"), 2);
    Cluster::start(&cfg, &hosts, 2, tmp.path(), "full").wait_ok(Duration::from_secs(90));
    let reference = read_metrics(full.to_str().unwrap(), &Default::default());
    assert_eq!(reference.len() as u64, steps);

    let out = tmp.path().join("killed");
    let cfg = cluster_config(&tmp.path().join("killed.yaml"), &videos, &out, steps);
    let hosts = hostfile(&tmp.path().join("hosts-killed"), 2);
    let mut cluster = Cluster::start(&cfg, &hosts, 2, tmp.path(), "killed");
    let first = out.join("checkpoints/step-00000004.safetensors");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !first.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after 60 s:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    cluster.kill();
    let last = out.join(format!("checkpoints/step-{steps:08}.safetensors"));
    assert!(!last.exists(), "killed too late: the run had finished");

    // Both processes again, with the same command (new ports: the old ones may linger).
    let hosts = hostfile(&tmp.path().join("hosts-again"), 2);
    Cluster::start(&cfg, &hosts, 2, tmp.path(), "again").wait_ok(Duration::from_secs(90));
    // The whole table (the killed run's rolled files and the resumed run's) is the
    // uninterrupted run's, digests included.
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_same_trace(&reference, rows.iter());
    for (a, b) in reference.iter().zip(&rows) {
        assert_eq!(a.params_digest, b.params_digest, "step {}", a.step);
    }
}

/// The live catalog in cluster mode: only process 0 lists, and its versions reach process 1
/// through the dataflow. A video added while the run goes is drawn by both processes' slots
/// (even slots: process 0, odd: process 1) after the version that has it takes effect, and a
/// deleted one is drawn by neither after the version without it.
#[test]
fn catalog_versions_reach_every_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (all, names, videos) = partial_corpus(tmp.path(), 4, 3);
    let steps = 40;
    let out = tmp.path().join("out");
    let cfg = cluster_config(&tmp.path().join("c.yaml"), &videos, &out, steps);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\ncatalog:\n  refresh_secs: 0.5\n")).unwrap();
    let hosts = hostfile(&tmp.path().join("hosts"), 2);
    let cluster = Cluster::start(&cfg, &hosts, 2, tmp.path(), "live");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("checkpoints/step-00000004.safetensors").exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (added, deleted) = (&names[3], &names[0]);
    std::fs::copy(all.join(added), videos.join(added)).unwrap();
    std::fs::remove_file(videos.join(deleted)).unwrap();
    cluster.wait_ok(Duration::from_secs(120));

    // The version records process 0 wrote: the first one with the change, and its step.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out_store =
        vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false).unwrap();
    let records = version_records(&rt, &out_store);
    let changed = records
        .iter()
        .find(|r| r.added.iter().any(|v| v.uri.ends_with(added.as_str())))
        .expect("a catalog version with the added video");
    assert!(
        changed
            .removed
            .iter()
            .any(|v| v.uri.ends_with(deleted.as_str())),
        "{changed:?}"
    );
    let from = changed.from_step;
    assert!(
        from < steps - 10,
        "the change took effect too late: step {from}"
    );
    let clips = read_clips(&out);
    assert_eq!(clips.len() as u64, steps * 4);
    let after: Vec<&ClipRow> = clips.iter().filter(|c| c.step >= from).collect();
    assert!(
        !after.iter().any(|c| c.uri.ends_with(deleted.as_str())),
        "the deleted video was drawn from step {from} on"
    );
    for parity in [0, 1] {
        assert!(
            after
                .iter()
                .any(|c| c.slot % 2 == parity && c.uri.ends_with(added.as_str())),
            "process {parity} never drew the added video after step {from}"
        );
    }
    assert!(
        !clips
            .iter()
            .any(|c| c.step < from && c.uri.ends_with(added.as_str())),
        "the added video was drawn before its version"
    );
}

/// SIGTERM to one process of a cluster while the store is out: that process gives up waiting
/// for its clips, the other learns it with the step's first exchange even though its own
/// clips never come, and both end at once with the last step trained, checkpointed (exit 143).
#[test]
fn a_stop_during_an_outage_reaches_the_process_that_was_not_signalled() {
    let Some(server) = vjepa_storage::testing::S3Server::start_or_skip(
        "a_stop_during_an_outage_reaches_the_process_that_was_not_signalled",
    )
    .unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = s3_corpus_config(&server, tmp.path(), without_periodic_checkpoints);
    let hosts = hostfile(&tmp.path().join("hosts"), 2);
    let mut cluster =
        Cluster::start_with_env(&cfg, &hosts, 2, tmp.path(), "outage", &s3_env(&server));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&cluster.logs[0])
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("step=1 ") && l.contains("train"))
    {
        assert!(
            Instant::now() < deadline,
            "no first step:\n{}",
            cluster.logs()
        );
        assert!(
            cluster
                .children
                .iter_mut()
                .all(|c| c.try_wait().unwrap().is_none()),
            "a process ended early:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(server);
    std::thread::sleep(Duration::from_secs(3));
    sigterm(cluster.children[0].id());
    let asked = Instant::now();
    let mut codes = [None, None];
    while codes.iter().any(Option::is_none) {
        for (i, c) in cluster.children.iter_mut().enumerate() {
            if codes[i].is_none()
                && let Some(status) = c.try_wait().unwrap()
            {
                codes[i] = Some(status.code());
            }
        }
        // (The cluster kills what is left when it drops.)
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "not stopped 60 s after SIGTERM:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs_text = cluster.logs();
    assert_eq!(codes, [Some(Some(143)), Some(Some(143))], "{logs_text}");
    assert!(
        std::fs::read_to_string(&cluster.logs[1])
            .unwrap()
            .contains("stopped by another process of the job"),
        "{logs_text}"
    );
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    let trained = rows.len() as u64;
    assert!(trained >= 1, "{logs_text}");
    assert!(
        out.join(format!("checkpoints/step-{trained:08}.safetensors"))
            .exists(),
        "the checkpoint of the last step trained:\n{logs_text}"
    );
}
