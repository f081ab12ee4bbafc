//! `iampool inject`: adds an iampool sidecar to Kubernetes workloads and points the
//! application at it.
//!
//! The input is a YAML stream (a file or stdin; several documents, `List`s). Each
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob or Pod
//! gets iampool as its first init container with `restartPolicy: Always` (a native sidecar,
//! Kubernetes 1.29+: it starts before the application and stops after it), and the
//! application containers' `DATABASE_URL` is split: the real database goes to the sidecar as
//! `IAMPOOL_UPSTREAM`, the application gets `postgres://user@127.0.0.1:6432/dbname`.
//!
//! Documents that are not workloads, and workloads that already have an `iampool` init
//! container, come out exactly as they went in, so injecting twice changes nothing. A
//! changed document is written anew (its comments are not kept).

mod documents;
mod url;

use serde_norway::{Mapping, Value};

/// What `iampool inject` was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The database, when the application's variable does not hold it (or to replace it).
    pub upstream: Option<String>,
    /// The application's variable holding the database URL.
    pub env_var: String,
    /// Containers to point at the sidecar; empty: every container that sets `env_var`.
    pub containers: Vec<String>,
    pub image: String,
    pub region: Option<String>,
    pub pool_size: u32,
    /// Where the sidecar listens for the application, on 127.0.0.1.
    pub port: u16,
    /// The sidecar's metrics and probe port, on every address of the pod.
    pub http_port: u16,
    /// Sets the pod's serviceAccountName (IRSA reads the role from its annotation).
    pub service_account: Option<String>,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upstream: None,
            env_var: "DATABASE_URL".into(),
            containers: Vec::new(),
            image: DEFAULT_IMAGE.into(),
            region: None,
            pool_size: 10,
            port: 6432,
            http_port: 9090,
            service_account: None,
            cpu_request: DEFAULT_CPU_REQUEST.into(),
            memory_request: DEFAULT_MEMORY_REQUEST.into(),
            memory_limit: DEFAULT_MEMORY_LIMIT.into(),
        }
    }
}

/// The image built from this version's Dockerfile.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/iampool/iampool:", env!("CARGO_PKG_VERSION"));
/// The sidecar's resources unless flags say otherwise.
pub const DEFAULT_CPU_REQUEST: &str = "50m";
pub const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";

/// The name of the sidecar container; finding it means "already injected".
pub const SIDECAR: &str = "iampool";

/// The injected stream, and what the person running inject should know.
#[derive(Debug)]
pub struct Injected {
    pub output: String,
    /// One line each: what was injected, skipped or dropped, and hints (IRSA).
    pub notes: Vec<String>,
}

/// A document that cannot be injected, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct InjectError {
    /// 1-based document number in the stream, and its first line.
    pub document: usize,
    pub line: usize,
    /// `Deployment web`, when known.
    pub object: Option<String>,
    pub message: String,
}

impl std::fmt::Display for InjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {} (line {})", self.document, self.line)?;
        if let Some(object) = &self.object {
            write!(f, ", {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InjectError {}

/// Injects every workload in `input`.
pub fn inject(input: &str, options: &Options) -> Result<Injected, InjectError> {
    let mut output = String::with_capacity(input.len() + 2048);
    let mut notes = Vec::new();
    let mut workloads = 0;
    for (index, doc) in documents::split(input).into_iter().enumerate() {
        let fail = |object: Option<String>, message: String| InjectError {
            document: index + 1,
            line: doc.line,
            object,
            message,
        };
        let mut value: Value = serde_norway::from_str(doc.body).map_err(|e| {
            // The parser's own message, not the text: it may quote a secret.
            let at = e.location().map_or(String::new(), |l| {
                format!(" at line {}", doc.line + l.line().saturating_sub(1))
            });
            fail(None, format!("not valid YAML{at}: {}", yaml_reason(&e)))
        })?;
        let changed = match &mut value {
            Value::Null => false,
            Value::Mapping(_) => {
                let mut outcome = Outcome::default();
                visit(&mut value, options, &mut outcome).map_err(|(object, m)| fail(object, m))?;
                workloads += outcome.workloads;
                notes.extend(outcome.notes);
                outcome.changed
            }
            _ => {
                return Err(fail(
                    None,
                    "not a Kubernetes object (expected a mapping with apiVersion and kind)".into(),
                ))
            }
        };
        output.push_str(doc.marker.unwrap_or(""));
        if changed {
            let text = serde_norway::to_string(&value).map_err(|e| fail(None, e.to_string()))?;
            output.push_str(&text);
        } else {
            output.push_str(doc.body);
        }
    }
    if workloads == 0 {
        return Err(InjectError {
            document: 0,
            line: 0,
            object: None,
            message: format!(
                "no workload found (one of {}, or a List of them)",
                WORKLOADS
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(Injected { output, notes })
}

/// What a document contributed.
#[derive(Default)]
struct Outcome {
    changed: bool,
    workloads: usize,
    notes: Vec<String>,
}

type Failure = (Option<String>, String);

/// Workload kinds and the path from the object to its pod spec.
const WORKLOADS: [(&str, &[&str]); 7] = [
    ("Deployment", &["spec", "template", "spec"]),
    ("StatefulSet", &["spec", "template", "spec"]),
    ("DaemonSet", &["spec", "template", "spec"]),
    ("ReplicaSet", &["spec", "template", "spec"]),
    ("Job", &["spec", "template", "spec"]),
    (
        "CronJob",
        &["spec", "jobTemplate", "spec", "template", "spec"],
    ),
    ("Pod", &["spec"]),
];

/// One object (or a List of them).
fn visit(value: &mut Value, options: &Options, outcome: &mut Outcome) -> Result<(), Failure> {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    let Some(kind) = kind else {
        return Err((None, "not a Kubernetes object: it has no kind".into()));
    };
    let object = format!("{kind} {name}");
    if kind == "List" || kind.ends_with("List") {
        let Some(Value::Sequence(items)) = value.get_mut("items") else {
            return Err((Some(object), "a List without items".into()));
        };
        for item in items {
            if !item.is_mapping() {
                return Err((Some(object), "a List item that is not an object".into()));
            }
            visit(item, options, outcome)?;
        }
        return Ok(());
    }
    let kind = if kind == "ReplicationController" {
        "ReplicaSet"
    } else {
        kind.as_str()
    };
    let Some((_, path)) = WORKLOADS.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    outcome.workloads += 1;
    let mut spec = &mut *value;
    for step in *path {
        spec = match spec.get_mut(*step) {
            Some(next) if next.is_mapping() => next,
            _ => {
                return Err((
                    Some(object),
                    format!("has no pod spec at {}", path.join(".")),
                ))
            }
        };
    }
    let Value::Mapping(spec) = spec else {
        unreachable!("checked to be a mapping")
    };
    match inject_pod(spec, options) {
        Ok(Some(notes)) => {
            outcome.changed = true;
            outcome
                .notes
                .push(format!("{object}: iampool sidecar added"));
            outcome
                .notes
                .extend(notes.into_iter().map(|n| format!("{object}: {n}")));
            Ok(())
        }
        Ok(None) => {
            outcome.notes.push(format!(
                "{object}: already has an iampool sidecar; left as it is"
            ));
            Ok(())
        }
        Err(message) => Err((Some(object), message)),
    }
}

/// Adds the sidecar to one pod spec. `Ok(None)`: it already has one.
fn inject_pod(spec: &mut Mapping, options: &Options) -> Result<Option<Vec<String>>, String> {
    let has_sidecar = |list: Option<&Value>| {
        list.and_then(Value::as_sequence).is_some_and(|list| {
            list.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR))
        })
    };
    if has_sidecar(spec.get("initContainers")) {
        return Ok(None);
    }
    if has_sidecar(spec.get("containers")) {
        return Err(format!(
            "has a container named {SIDECAR} already (not as a native sidecar); remove it, then inject"
        ));
    }
    let Some(Value::Sequence(containers)) = spec.get("containers") else {
        return Err("the pod spec has no containers".into());
    };
    let names: Vec<String> = containers
        .iter()
        .map(|c| {
            c.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    for wanted in &options.containers {
        if !names.contains(wanted) {
            return Err(format!(
                "no container named {wanted:?} (containers: {})",
                names.join(", ")
            ));
        }
    }
    // Which containers, and what their variable says now.
    let var = options.env_var.as_str();
    let mut targets = Vec::new();
    let mut seen_urls: Vec<(String, String)> = Vec::new();
    let mut from_elsewhere = Vec::new();
    for (index, container) in containers.iter().enumerate() {
        let name = &names[index];
        let chosen = options.containers.is_empty() || options.containers.contains(name);
        if !chosen {
            continue;
        }
        match env_entry(container, var) {
            Some(entry) => match entry.get("value").and_then(Value::as_str) {
                Some(url) => {
                    seen_urls.push((name.clone(), url.to_owned()));
                    targets.push(index);
                }
                None => {
                    from_elsewhere.push(name.clone());
                    targets.push(index);
                }
            },
            None if options.upstream.is_some() || !options.containers.is_empty() => {
                targets.push(index)
            }
            None => {}
        }
    }
    let app_url = match (&options.upstream, seen_urls.as_slice()) {
        (Some(url), _) => url.clone(),
        (None, [(_, url)]) => url.clone(),
        (None, [(first, url), rest @ ..]) => {
            if let Some((other, _)) = rest.iter().find(|(_, u)| u != url) {
                return Err(format!(
                    "containers {first} and {other} set different {var}; inject one with --container NAME, or pass --upstream URL"
                ));
            }
            url.clone()
        }
        (None, []) if !from_elsewhere.is_empty() => {
            return Err(format!(
                "{var} of {} comes from valueFrom (a Secret or ConfigMap), which inject cannot read; pass the database as --upstream URL",
                from_elsewhere.join(", ")
            ))
        }
        (None, []) => {
            return Err(format!(
                "no container sets {var} to a URL; pass --upstream URL (and --env-var NAME if the application reads another variable)"
            ))
        }
    };
    if targets.is_empty() {
        return Err(format!(
            "no container to point at the sidecar; name one with --container (containers: {})",
            names.join(", ")
        ));
    }
    let split = url::split(
        &app_url,
        &url::Want {
            port: options.port,
            region: options.region.as_deref(),
        },
    )?;
    check_ports_free(spec, options)?;
    let mut notes = split.notes;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        notes.push(format!(
            "uses hostNetwork: iampool's ports {} and {} are the node's, so two such pods on one node collide; pick free ones with --port and --http-port",
            options.port, options.http_port
        ));
    }

    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        unreachable!("checked above")
    };
    for index in targets {
        set_env(&mut containers[index], var, &split.local);
    }
    let sidecar = sidecar(options, &split.upstream);
    match spec.get_mut("initContainers") {
        Some(Value::Sequence(list)) => list.insert(0, sidecar),
        Some(Value::Null) | None => {
            spec.insert("initContainers".into(), Value::Sequence(vec![sidecar]));
        }
        Some(_) => return Err("initContainers is not a list".into()),
    }
    match (&options.service_account, spec.get("serviceAccountName")) {
        (Some(account), _) => {
            spec.insert("serviceAccountName".into(), account.as_str().into());
        }
        (None, Some(_)) => {}
        (None, None) => notes.push(
            "runs as the namespace's default ServiceAccount: for IRSA give --service-account NAME (a ServiceAccount annotated eks.amazonaws.com/role-arn), or create an EKS Pod Identity association for it".into(),
        ),
    }
    Ok(Some(notes))
}

/// The `env` entry of `container` named `var`.
fn env_entry<'a>(container: &'a Value, var: &str) -> Option<&'a Value> {
    container
        .get("env")?
        .as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(var))
}

/// Sets `var` in place (keeping its position), or appends it.
fn set_env(container: &mut Value, var: &str, value: &str) {
    let Value::Mapping(container) = container else {
        return;
    };
    let entry = env_var(var, value);
    match container.get_mut("env") {
        Some(Value::Sequence(env)) => {
            match env
                .iter_mut()
                .find(|e| e.get("name").and_then(Value::as_str) == Some(var))
            {
                Some(existing) => *existing = entry,
                None => env.push(entry),
            }
        }
        _ => {
            container.insert("env".into(), Value::Sequence(vec![entry]));
        }
    }
}

fn env_var(name: &str, value: &str) -> Value {
    map([("name", name.into()), ("value", value.into())])
}

/// The sidecar's ports must not be taken by a container of the pod.
fn check_ports_free(spec: &Mapping, options: &Options) -> Result<(), String> {
    for list in ["containers", "initContainers"] {
        let Some(containers) = spec.get(list).and_then(Value::as_sequence) else {
            continue;
        };
        for container in containers {
            let ports = container.get("ports").and_then(Value::as_sequence);
            for port in ports.into_iter().flatten() {
                let number = port.get("containerPort").and_then(Value::as_u64);
                for (taken, flag) in [(options.port, "--port"), (options.http_port, "--http-port")]
                {
                    if number == Some(u64::from(taken)) {
                        let who = container.get("name").and_then(Value::as_str).unwrap_or("?");
                        return Err(format!(
                            "container {who} already uses port {taken}; choose another with {flag}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(k.into(), v);
    }
    Value::Mapping(m)
}

fn probe(path: &str, period: u64, failures: Option<u64>) -> Value {
    let mut probe = map([
        (
            "httpGet",
            map([("path", path.into()), ("port", "iampool-http".into())]),
        ),
        ("periodSeconds", period.into()),
    ]);
    if let (Some(failures), Value::Mapping(m)) = (failures, &mut probe) {
        m.insert("failureThreshold".into(), failures.into());
    }
    probe
}

/// The iampool container: a native sidecar that listens on 127.0.0.1 for the pod's
/// containers only (hence trust), serves probes and metrics on `http_port`, and runs as an
/// unprivileged user on a read-only root filesystem.
fn sidecar(options: &Options, upstream: &str) -> Value {
    let env = vec![
        env_var("IAMPOOL_UPSTREAM", upstream),
        env_var("IAMPOOL_LISTEN", &format!("127.0.0.1:{}", options.port)),
        env_var("IAMPOOL_AUTH_TYPE", "trust"),
        env_var(
            "IAMPOOL_METRICS_LISTEN",
            &format!("0.0.0.0:{}", options.http_port),
        ),
        env_var("IAMPOOL_POOL_SIZE", &options.pool_size.to_string()),
        env_var("IAMPOOL_LOG_FORMAT", "json"),
    ];
    map([
        ("name", SIDECAR.into()),
        ("image", options.image.as_str().into()),
        ("restartPolicy", "Always".into()),
        ("env", Value::Sequence(env)),
        (
            "ports",
            Value::Sequence(vec![map([
                ("name", "iampool-http".into()),
                ("containerPort", u64::from(options.http_port).into()),
            ])]),
        ),
        // Up to a minute for the first upstream login; the application starts after it.
        ("startupProbe", probe("/startup", 1, Some(60))),
        ("livenessProbe", probe("/liveness", 10, None)),
        ("readinessProbe", probe("/readiness", 5, None)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([
                        ("cpu", options.cpu_request.as_str().into()),
                        ("memory", options.memory_request.as_str().into()),
                    ]),
                ),
                (
                    "limits",
                    map([("memory", options.memory_limit.as_str().into())]),
                ),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsNonRoot", true.into()),
                ("runAsUser", 65532u64.into()),
                ("runAsGroup", 65532u64.into()),
                ("readOnlyRootFilesystem", true.into()),
                ("allowPrivilegeEscalation", false.into()),
                (
                    "capabilities",
                    map([("drop", Value::Sequence(vec!["ALL".into()]))]),
                ),
                ("seccompProfile", map([("type", "RuntimeDefault".into())])),
            ]),
        ),
    ])
}

/// The parser's complaint without its position (given separately) or any quoted text.
fn yaml_reason(e: &serde_norway::Error) -> String {
    let text = e.to_string();
    let reason = text.split(" at line ").next().unwrap_or(&text);
    reason.to_owned()
}
