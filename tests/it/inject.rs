//! `iampool inject` as a user runs it: golden files for every workload kind, idempotence,
//! refusals, and every output and example manifest validated against the Kubernetes API
//! schemas in strict mode (tests/support/validate_k8s.py, kubernetes-validate).
//!
//! Each `tests/inject/NAME.yaml` starts with `# iampool inject ARGS`; the expected output is
//! `NAME.out.yaml` (`UPDATE_GOLDEN=1` rewrites them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pooler::run;

const LIMIT: Duration = Duration::from_secs(60);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The golden inputs, sorted.
fn inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(root().join("tests/inject"))
        .expect("tests/inject")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".yaml") && !name.ends_with(".out.yaml")
        })
        .collect();
    inputs.sort();
    inputs
}

fn out_path(input: &Path) -> PathBuf {
    input.with_extension("out.yaml")
}

/// `iampool inject ARGS FILE` (ARGS from the file's first line): (ok, stdout, stderr).
fn inject_file(input: &Path) -> (bool, String, String) {
    let text = std::fs::read_to_string(input).expect("read input");
    let args = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# iampool inject"))
        .unwrap_or_else(|| panic!("{} must start with '# iampool inject'", input.display()));
    run(
        Command::new(env!("CARGO_BIN_EXE_iampool"))
            .arg("inject")
            .args(args.split_whitespace())
            .arg(input),
        LIMIT,
    )
}

fn inject_stdin(args: &[&str], yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).unwrap();
    run(
        Command::new(env!("CARGO_BIN_EXE_iampool"))
            .arg("inject")
            .args(args)
            .arg("-")
            .stdin(std::fs::File::open(&file).unwrap()),
        LIMIT,
    )
}

#[test]
fn every_kind_is_injected_as_its_golden_file_says() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let inputs = inputs();
    let kinds: Vec<String> = inputs
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for kind in [
        "deployment",
        "statefulset",
        "daemonset",
        "replicaset",
        "job",
        "cronjob",
        "pod",
        "list",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no golden input for {kind}"
        );
    }
    for input in &inputs {
        let (ok, out, err) = inject_file(input);
        assert!(ok, "{}: {err}", input.display());
        assert!(
            err.contains("iampool sidecar added"),
            "{}: {err}",
            input.display()
        );
        let golden = out_path(input);
        if update {
            std::fs::write(&golden, &out).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
        assert_eq!(
            out,
            want,
            "{} differs from {}",
            input.display(),
            golden.display()
        );
    }
}

/// Injecting an injected file changes nothing, and says so.
#[test]
fn injecting_twice_changes_nothing() {
    for input in inputs() {
        let once = std::fs::read_to_string(out_path(&input)).expect("golden output");
        let (ok, twice, err) = inject_stdin(&[], &once);
        assert!(ok, "{}: {err}", input.display());
        assert_eq!(twice, once, "{}", input.display());
        assert!(err.contains("already has an iampool sidecar"), "{err}");
        assert!(!err.contains("sidecar added"), "{err}");
    }
}

/// What inject refuses, each with a message that says what to do, exit status 2, nothing on
/// stdout, and never the URL's password.
#[test]
fn unsupported_input_is_refused_with_a_clear_error() {
    let deployment = |env: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n        - name: web\n          image: web\n{env}"
        )
    };
    let secret_env = "          env:\n            - name: DATABASE_URL\n              valueFrom: {secretKeyRef: {name: db, key: url}}\n";
    let cases: Vec<(&[&str], String, &str)> = vec![
        (&[], "kind: [\n".into(), "not valid YAML at line 2"),
        (&[], "- a\n- b\n".into(), "not a Kubernetes object"),
        (&[], "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n".into(), "no workload found"),
        (&[], deployment(""), "no container sets DATABASE_URL to a URL; pass --upstream"),
        (&[], deployment(secret_env), "comes from valueFrom"),
        (
            &[],
            deployment("          env:\n            - {name: DATABASE_URL, value: \"postgres://u:hunter2hunter2@10.1.2.3/db\"}\n"),
            "",
        ),
        (
            &[],
            deployment("          env:\n            - {name: DATABASE_URL, value: \"postgres://u@10.1.2.3/db\"}\n"),
            "cannot be inferred from \"10.1.2.3\"",
        ),
        (
            &["--container", "api"],
            deployment("          env:\n            - {name: DATABASE_URL, value: \"postgres://u@db.us-east-1.rds.amazonaws.com/db\"}\n"),
            "no container named \"api\" (containers: web)",
        ),
        (
            &[],
            deployment("          ports: [{containerPort: 6432}]\n          env:\n            - {name: DATABASE_URL, value: \"postgres://u@db.us-east-1.rds.amazonaws.com/db\"}\n"),
            "already uses port 6432; choose another with --port",
        ),
        (
            &[],
            deployment("          env:\n            - {name: DATABASE_URL, value: \"mysql://u:hunter2hunter2@db/x\"}\n"),
            "is not a postgres:// or postgresql:// URL",
        ),
    ];
    for (args, yaml, says) in cases {
        let (ok, out, err) = inject_stdin(args, &yaml);
        if says.is_empty() {
            // A password upstream is accepted (iampool signs in with it, not with IAM).
            assert!(ok, "{err}");
            assert!(!err.contains("hunter2hunter2"), "{err}");
            continue;
        }
        assert!(!ok, "accepted: {yaml}\n{out}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(says), "{yaml}\nwant {says:?} in: {err}");
        assert!(!err.contains("hunter2hunter2"), "{err}");
    }
}

/// Every golden output and every example manifest passes the Kubernetes API schemas in strict
/// mode, and a manifest with a mistake fails (so the validation can fail).
#[test]
fn outputs_and_example_manifests_are_valid_kubernetes() {
    let python = root().join("target/driver-venv/bin/python");
    assert!(
        python.exists(),
        "the test venv is missing ({}): run scripts/setup.sh",
        python.display()
    );
    let validator = root().join("tests/support/validate_k8s.py");
    let mut files: Vec<PathBuf> = inputs().iter().map(|p| out_path(p)).collect();
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("config/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    files.extend(examples);
    let (ok, out, err) = run(Command::new(&python).arg(&validator).args(&files), LIMIT);
    assert!(ok, "schema validation failed:\n{out}\n{err}");
    assert!(out.contains(" 0 failed"), "{out}");

    let broken = std::fs::read_to_string(out_path(&root().join("tests/inject/deployment.yaml")))
        .unwrap()
        .replace("periodSeconds: 10", "periodSecond: 10");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let (ok, out, _) = run(Command::new(&python).arg(&validator).arg(&file), LIMIT);
    assert!(!ok, "a misspelt field passed:\n{out}");
    assert!(out.contains("periodSecond"), "{out}");
}

/// A hostNetwork pod is injected with a warning: the sidecar's ports are the node's.
#[test]
fn host_network_pods_are_warned_about_their_ports() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers:\n    - name: a\n      image: a\n      env: [{name: DATABASE_URL, value: \"postgres://u@db.us-east-1.rds.amazonaws.com/d\"}]\n";
    let (ok, out, err) = inject_stdin(&["--port", "7432"], pod);
    assert!(ok, "{err}");
    assert!(out.contains("127.0.0.1:7432"), "{out}");
    assert!(
        err.contains("uses hostNetwork: iampool's ports 7432 and 9090 are the node's"),
        "{err}"
    );
}
