//! The deployment files in `ops/deploy/` (issue 7): the Kubernetes manifest for cluster mode and
//! the systemd unit parse, agree with themselves (process counts, hostfile, ports, secret
//! names), and the binary's config check passes with exactly the files and environment they
//! give the job — and refuses, naming the key, without the credentials.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_yaml::Value;

use common::*;

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|x| s(x).to_string())
        .collect()
}

/// Kubernetes' `$(VAR)` expansion of container args from the container's environment.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    while let Some(start) = out.find("$(") {
        let end = out[start..].find(')').expect("closing parenthesis") + start;
        let name = &out[start + 2..end];
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("args use $({name}), which the container does not define"));
        out = format!("{}{}{}", &out[..start], value, &out[end + 1..]);
    }
    out
}

fn run(args: &[String], env: &BTreeMap<String, String>) -> Output {
    Command::new(bin())
        .args(args)
        .env_clear()
        .envs(env)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn kubernetes_cluster_manifest() {
    let dir = repo_root().join("ops/deploy/kubernetes");
    let docs = docs(&dir.join("vjepa.yaml"));
    let secret_docs = docs_of_secret(&dir.join("secret.example.yaml"));
    let config_map = kind(&docs, "ConfigMap");
    let service = kind(&docs, "Service");
    let job = kind(&docs, "Job");
    let spec = &job["spec"];
    let pod = &spec["template"]["spec"];

    // One pod per timely process, its index the process id.
    assert_eq!(s(&spec["completionMode"]), "Indexed");
    let n = spec["completions"].as_u64().expect("completions");
    assert_eq!(
        spec["parallelism"].as_u64(),
        Some(n),
        "all processes run at once"
    );
    let init = &pod["initContainers"][0];
    let main = &pod["containers"][0];
    let env_of = |c: &Value| -> BTreeMap<String, Value> {
        c["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|e| (s(&e["name"]).to_string(), e.clone()))
            .collect()
    };
    let env = env_of(main);
    assert_eq!(env, env_of(init), "check and job see the same environment");
    assert_eq!(s(&env["VJEPA_PROCESSES"]["value"]), n.to_string());
    assert_eq!(
        s(&env["VJEPA_PROCESS"]["valueFrom"]["fieldRef"]["fieldPath"]),
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );

    // The hostfile names every pod through the headless Service, on the timely port.
    assert!(service["spec"]["clusterIP"] == "None", "headless service");
    assert_eq!(s(&pod["subdomain"]), s(&service["metadata"]["name"]));
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&labels[s(k)], v, "service selects the job's pods");
    }
    let timely_port = service["spec"]["ports"][0]["port"].as_u64().expect("port");
    let hostfile = s(&config_map["data"]["hostfile"]);
    let hosts: Vec<&str> = hostfile.lines().filter(|l| !l.trim().is_empty()).collect();
    let expected: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{}-{i}.{}:{timely_port}",
                s(&job["metadata"]["name"]),
                s(&service["metadata"]["name"])
            )
        })
        .collect();
    assert_eq!(hosts, expected, "hostfile line i = pod i");

    // Ports: the scrape job of ops/prometheus/kubernetes-scrape.yml keeps only the pod of
    // process 0 (the only one serving), names the job as the alerts expect, and scrapes the
    // port the job listens on.
    assert!(
        spec["template"]["metadata"]["annotations"]["prometheus.io/scrape"].is_null(),
        "every pod annotated for scraping: the ones that do not serve would show as down"
    );
    let scrape = self::docs(&repo_root().join("ops/prometheus/kubernetes-scrape.yml"));
    let job_cfg = &scrape[0]["scrape_configs"][0];
    assert_eq!(s(&job_cfg["job_name"]), "vjepa");
    let relabel = job_cfg["relabel_configs"].as_sequence().expect("relabel");
    let keeps: Vec<(String, String)> = relabel
        .iter()
        .filter(|r| r["action"].as_str() == Some("keep"))
        .map(|r| {
            (
                s(&r["source_labels"][0]).to_string(),
                s(&r["regex"]).to_string(),
            )
        })
        .collect();
    assert!(keeps.contains(&(
        "__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index".into(),
        "0".into()
    )));
    let address = relabel
        .iter()
        .find(|r| r["target_label"].as_str() == Some("__address__"))
        .expect("address rewrite");
    let metrics_port: u64 = s(&address["replacement"])
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // A stop (deletion, eviction) lets the step in progress finish with its checkpoint.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30) >= 60);
    // A refused config (2) or a diverged loss (3) fails again on every retry: the Job ends on
    // them (a pod failure policy, which needs restartPolicy Never); other failures retry.
    assert_eq!(s(&pod["restartPolicy"]), "Never");
    let rules = spec["podFailurePolicy"]["rules"]
        .as_sequence()
        .expect("podFailurePolicy.rules");
    // The exit codes the rules of `action` name (`In`), checking whose exit they read.
    let exit_codes = |action: &str, container: Option<&str>| -> Vec<u64> {
        rules
            .iter()
            .filter(|r| s(&r["action"]) == action && !r["onExitCodes"].is_null())
            .flat_map(|r| {
                assert_eq!(s(&r["onExitCodes"]["operator"]), "In");
                if let Some(name) = container {
                    assert_eq!(s(&r["onExitCodes"]["containerName"]), name);
                }
                r["onExitCodes"]["values"]
                    .as_sequence()
                    .expect("values")
                    .iter()
                    .map(|v| v.as_u64().expect("exit code"))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(exit_codes("FailJob", None), [2, 3]);
    assert!(
        rules.iter().any(|r| s(&r["action"]) == "Ignore"
            && s(&r["onPodConditions"][0]["type"]) == "DisruptionTarget"),
        "evictions are not failures"
    );
    // A clean stop (SIGTERM/SIGINT: a step, its checkpoint, exit 128 + signal) is not one
    // either, and only the main container's exit says so.
    let stop_codes: Vec<u64> = [
        vjepa_pipeline::shutdown::SIGINT,
        vjepa_pipeline::shutdown::SIGTERM,
    ]
    .iter()
    .map(|&sig| u64::from(vjepa_pipeline::shutdown::exit_status(sig)))
    .collect();
    assert_eq!(exit_codes("Ignore", Some(s(&main["name"]))), stop_codes);
    let ports: BTreeMap<String, u64> = main["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                s(&p["name"]).to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["metrics"], metrics_port);
    assert_eq!(ports["timely"], timely_port);
    let main_args = strings(&main["args"]);
    assert!(
        main_args.contains(&format!("--listen=0.0.0.0:{metrics_port}")),
        "{main_args:?}"
    );

    // Credentials come from the Secret, whose keys the example provides.
    let secret_name = s(&secret_docs["metadata"]["name"]);
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let r = &env[name]["valueFrom"]["secretKeyRef"];
        assert_eq!(s(&r["name"]), secret_name);
        assert!(!secret_docs["stringData"][s(&r["key"])].is_null(), "{name}");
    }

    // The job's and the check's command lines name the same config and cluster flags.
    let init_args = strings(&init["args"]);
    assert_eq!(init_args[0], "check-config");
    let shared = |args: &[String]| -> Vec<String> {
        args.iter()
            .filter(|a| {
                a.starts_with("--config")
                    || a.starts_with("--process")
                    || a.starts_with("--hostfile")
            })
            .cloned()
            .collect()
    };
    assert_eq!(shared(&init_args), shared(&main_args));
    assert_eq!(shared(&init_args).len(), 4, "{init_args:?}");

    // Run the check as each pod would: the ConfigMap mounted, the environment resolved.
    let mount = s(&init["volumeMounts"][0]["mountPath"]).to_string();
    let tmp = tempfile::tempdir().unwrap();
    for (file, content) in config_map["data"].as_mapping().unwrap() {
        std::fs::write(tmp.path().join(s(file)), s(content)).unwrap();
    }
    let secret_value = s(&secret_docs["stringData"]["AWS_SECRET_ACCESS_KEY"]).to_string();
    for index in 0..n {
        let mut vars = BTreeMap::new();
        for (name, e) in &env {
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if !e["valueFrom"]["fieldRef"].is_null() {
                index.to_string()
            } else {
                let key = s(&e["valueFrom"]["secretKeyRef"]["key"]);
                s(&secret_docs["stringData"][key]).to_string()
            };
            vars.insert(name.clone(), value);
        }
        let args: Vec<String> = init_args
            .iter()
            .map(|a| expand(a, &vars).replace(&mount, &tmp.path().display().to_string()))
            .collect();
        let ok = run(&args, &vars);
        assert_eq!(ok.status.code(), Some(0), "process {index}: {}", text(&ok));
        let out = text(&ok);
        assert!(out.contains("location: data.datasets[0]"), "{out}");
        assert!(out.contains("location: outputs.dir"), "{out}");
        assert!(!out.contains(&secret_value), "the secret is never printed");

        // Without the Secret the check refuses before any work, naming the key.
        vars.remove("AWS_SECRET_ACCESS_KEY");
        vars.remove("AWS_ACCESS_KEY_ID");
        // (And no instance profile to fall back on, wherever the test runs.)
        vars.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
        let refused = run(&args, &vars);
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
        assert!(
            text(&refused).contains("data.datasets[0]"),
            "{}",
            text(&refused)
        );
    }

    // The job's own command line parses (clap answers --help only when every flag before it
    // is known).
    let mut vars = BTreeMap::new();
    vars.insert("VJEPA_PROCESSES".to_string(), n.to_string());
    vars.insert("VJEPA_PROCESS".to_string(), "0".to_string());
    let mut args: Vec<String> = main_args.iter().map(|a| expand(a, &vars)).collect();
    args.push("--help".into());
    let help = run(&args, &BTreeMap::new());
    assert_eq!(help.status.code(), Some(0), "{}", text(&help));
}

fn docs_of_secret(path: &Path) -> Value {
    let d = docs(path);
    kind(&d, "Secret").clone()
}

/// `KEY=VALUE` lines of a systemd EnvironmentFile (comments and blank lines skipped).
fn environment_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn systemd_unit() {
    let dir = repo_root().join("ops/deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("vjepa.service")).unwrap();
    let mut section = String::new();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        keys.entry(format!("{section}.{k}"))
            .or_default()
            .push(v.to_string());
    }
    for k in [
        "Unit.Description",
        "Service.ExecStart",
        "Service.ExecStartPre",
        "Service.EnvironmentFile",
        "Service.Restart",
        "Install.WantedBy",
    ] {
        assert!(keys.contains_key(k), "{k} missing");
    }
    assert_eq!(keys["Service.RestartPreventExitStatus"], ["2 3"]);
    // RestartPreventExitStatus does not cover ExecStartPre: a start limit ends the retries of
    // a refused config; a stop (SIGTERM: a step, its checkpoint, exit 143) is a clean one.
    assert!(
        keys.contains_key("Unit.StartLimitIntervalSec")
            && keys.contains_key("Unit.StartLimitBurst")
    );
    assert_eq!(keys["Service.SuccessExitStatus"], ["143"]);

    // The pre-start check with the example environment file and a config of S3 locations
    // (the Kubernetes one): it passes, then refuses without the credentials.
    let mut env = environment_file(&dir.join("vjepa.env.example"));
    let k8s = docs(&repo_root().join("ops/deploy/kubernetes/vjepa.yaml"));
    let config = s(&kind(&k8s, "ConfigMap")["data"]["config.yaml"]).to_string();
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let command = |line: &str| -> Vec<String> {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/vjepa"));
        words
            .map(|w| w.replace("/etc/vjepa/config.yaml", &config_path.display().to_string()))
            .collect()
    };
    let pre = command(&keys["Service.ExecStartPre"][0]);
    assert!(pre.contains(&"--locations".to_string()), "{pre:?}");
    let ok = run(&pre, &env);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(!text(&ok).contains(&env["AWS_SECRET_ACCESS_KEY"]));
    env.remove("AWS_ACCESS_KEY_ID");
    // (And no instance profile to fall back on, wherever the test runs.)
    env.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
    let refused = run(&pre, &env);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("data.datasets[0]"));

    let mut start = command(&keys["Service.ExecStart"][0]);
    start.push("--help".into());
    let help = run(&start, &BTreeMap::new());
    assert_eq!(help.status.code(), Some(0), "{}", text(&help));
}
